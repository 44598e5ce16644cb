"""SigLIP vision encoder on Megatron-Core (transformers' ``SiglipVisionModel``, no pooling head).

Patch conv (with bias) + learned absolute positions (no class token) -> pre-LN layers with
LayerNorm (with bias), biased q/k/v/out, a GELU-tanh MLP with biases -> ``post_layernorm``
(applied when the last layer feeds the projector, as ``last_hidden_state``). Fixed-resolution
SigLIP and SigLIP2 checkpoints share this module. Tile batching, sequence-parallel padding and
masking come from ``InternViT.forward``; position resizing from ``AIMv2Encoder.positions``
(bicubic, as transformers' ``interpolate_pos_encoding=True``; other tile sizes than the trained
one always interpolate here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sail.config.model import VisionConfig
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.models.aimv2 import AIMv2Encoder
from megatron_sail.models.vit import encoder_transformer_config


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (transformers' ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


def siglip_transformer_config(v: VisionConfig, parallel: ParallelConfig,
                              dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """LayerNorm, biases on every linear (q/k/v included), GELU-tanh MLP, no QK-norm."""
    return encoder_transformer_config(
        v, parallel, dtype, normalization="LayerNorm", add_bias_linear=True, add_qkv_bias=True,
        gated_linear_unit=False, activation_func=gelu_tanh, qk_layernorm=False)


def check_siglip_vision(v: VisionConfig) -> None:
    """Refuse VisionConfig fields SigLIP has no place for, rather than ignoring them."""
    wrong = [f"{name}={getattr(v, name)!r}" for name, want in
             (("norm_type", "layer_norm"), ("qkv_bias", True), ("qk_norm", False))
             if getattr(v, name) != want]
    if wrong:
        raise ValueError(f"siglip vision family: {', '.join(wrong)} is not SigLIP (LayerNorm, "
                         "q/k/v bias, no QK-norm)")


class SigLIPEncoder(AIMv2Encoder):
    """Tiles [T, 3, H, W] -> patch features [T, (H/p)*(W/p), hidden] (no class token)."""

    class_tokens = 0

    def __init__(self, vision: VisionConfig, parallel: ParallelConfig,
                 dtype: torch.dtype = torch.float32, use_te: bool = False):
        check_siglip_vision(vision)
        config = siglip_transformer_config(vision, parallel, dtype)
        MegatronModule.__init__(self, config=config)
        self.vision = vision
        d, grid = vision.hidden_size, vision.image_size // vision.patch_size
        self.patch_embedding = torch.nn.Conv2d(3, d, vision.patch_size, vision.patch_size, dtype=dtype)
        self.position_embedding = torch.nn.Parameter(torch.zeros(grid * grid, d, dtype=dtype))
        # post_layernorm feeds only the last layer's output (key map: not built otherwise).
        self.final_norm = (torch.nn.LayerNorm(d, eps=vision.norm_eps, dtype=dtype)
                           if vision.layers_used == vision.num_layers else None)
        self.encoder = self.trunk(config, vision, use_te, qkv_bias=True)

    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        """Patch embeddings + positions: [T, N, hidden]."""
        x = self.patch_embedding(tiles.to(self.patch_embedding.weight.dtype))
        gh, gw = x.shape[-2:]
        return x.flatten(2).transpose(1, 2) + self.positions(gh, gw)

    def finish(self, features: torch.Tensor) -> torch.Tensor:
        """``post_layernorm`` when the last layer is selected; an earlier layer's hidden state
        is read un-normalized (transformers' ``hidden_states[k]``)."""
        if self.final_norm is None:
            return features
        return self.final_norm(features)
