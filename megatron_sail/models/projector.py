"""Pixel shuffle (InternVL "v2") and the MLP projector ("mlp1"), tensor-parallel.

The projector's input is replicated on every TP rank (never sequence-parallel): LayerNorm runs
replicated, then Linear1 is column-parallel and Linear2 row-parallel, so the output (the visual
tokens spliced into the LM) is again replicated.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sail.config.model import ProjectorConfig


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[T, N, C] patch features -> [T, N*r^2, C/r^2], in InternVL's "v2" element order.

    Same reshapes as InternVL (and transformers' InternVLModel.pixel_shuffle), so a checkpoint's
    projector sees features in the order it was trained on.
    """
    t, n, c = x.shape
    side = round(n**0.5)
    if side * side != n:
        raise ValueError(f"pixel shuffle needs a square patch grid, got {n} patches")
    if side * ratio != int(side * ratio):
        raise ValueError(
            f"patch grid {side}x{side} is not divisible by 1/{ratio} "
            "(ProjectorConfig.odd_grid='pad' zero-pads it)"
        )
    h = int(side * ratio)
    x = x.reshape(t, side, side, c)
    x = x.reshape(t, side, h, int(c / ratio)).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(t, h, h, int(c / (ratio * ratio))).permute(0, 2, 1, 3).contiguous()
    return x.reshape(t, h * h, -1)


def pad_grid(x: torch.Tensor, merge: int) -> torch.Tensor:
    """[T, g*g, C] -> [T, G*G, C] with G = g rounded up to a multiple of ``merge``: zero patch
    features appended on the bottom rows and right columns (Ovis2's rule for odd grids), so the
    pixel shuffle can merge every patch. A grid that already divides is returned unchanged."""
    t, n, c = x.shape
    side = round(n**0.5)
    if side * side != n:
        raise ValueError(f"pixel shuffle needs a square patch grid, got {n} patches")
    pad = (-side) % merge
    if not pad:
        return x
    x = F.pad(x.reshape(t, side, side, c), (0, 0, 0, pad, 0, pad))
    return x.reshape(t, (side + pad) ** 2, c)


class Projector(MegatronModule):
    """LayerNorm(d_vit*m^2) -> Linear -> GELU -> Linear(d_llm), m = 1/downsample_ratio."""

    def __init__(self, cfg: ProjectorConfig, vit_hidden: int, llm_hidden: int, lm_config: TransformerConfig):
        config = dataclasses.replace(lm_config, sequence_parallel=False)
        super().__init__(config=config)
        self.cfg = cfg
        d_in = vit_hidden * cfg.merge**2
        self.layer_norm = torch.nn.LayerNorm(d_in, eps=cfg.norm_eps, dtype=config.params_dtype)
        init = config.init_method
        self.linear_1 = tensor_parallel.ColumnParallelLinear(
            d_in, llm_hidden, config=config, init_method=init, bias=True, gather_output=False
        )
        self.linear_2 = tensor_parallel.RowParallelLinear(
            llm_hidden,
            llm_hidden,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[T, N, d_vit] ViT features -> [T * N*r^2, d_llm] visual tokens, tile-major order."""
        if self.cfg.odd_grid == "pad":
            features = pad_grid(features, self.cfg.merge)
        x = pixel_shuffle(features, self.cfg.downsample_ratio)
        x, _ = self.linear_1(self.layer_norm(x))
        x, _ = self.linear_2(F.gelu(x))
        return x.reshape(-1, x.size(-1))
