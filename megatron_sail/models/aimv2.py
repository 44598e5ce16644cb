"""AIMv2 vision encoder on Megatron-Core (transformers' ``Aimv2VisionModel``, no pooling head).

Patch conv -> RMSNorm -> + learned absolute positions (no class token) -> pre-norm layers with
RMSNorm, bias-free attention and a SwiGLU MLP -> final RMSNorm (applied when the last layer feeds
the projector, as ``last_hidden_state``). Tile batching, sequence-parallel padding and masking
come from ``InternViT.forward``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sail.config.model import VisionConfig
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.models import layer_specs
from megatron_sail.models.vit import InternViT, encoder_transformer_config


def aimv2_transformer_config(v: VisionConfig, parallel: ParallelConfig,
                             dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """RMSNorm, SwiGLU (silu gate), no bias on any linear, no QK-norm; whole encoder on stage 0."""
    return encoder_transformer_config(
        v, parallel, dtype, normalization="RMSNorm", add_bias_linear=False, add_qkv_bias=False,
        gated_linear_unit=True, activation_func=F.silu, qk_layernorm=False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, returned in the input dtype (as transformers' Aimv2RMSNorm)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class AIMv2Encoder(InternViT):
    """Tiles [T, 3, H, W] -> patch features [T, (H/p)*(W/p), hidden] (no class token)."""

    class_tokens = 0

    def __init__(self, vision: VisionConfig, parallel: ParallelConfig,
                 dtype: torch.dtype = torch.float32, use_te: bool = False):
        config = aimv2_transformer_config(vision, parallel, dtype)
        MegatronModule.__init__(self, config=config)
        self.vision = vision
        d, grid = vision.hidden_size, vision.image_size // vision.patch_size
        self.patch_embedding = torch.nn.Conv2d(3, d, vision.patch_size, vision.patch_size, dtype=dtype)
        self.patch_norm = torch.nn.Parameter(torch.ones(d, dtype=dtype))
        self.position_embedding = torch.nn.Parameter(torch.zeros(grid * grid, d, dtype=dtype))
        # The trunk's final norm feeds only the last layer's output: with an earlier select_layer
        # it is never used, so (as the family's key map says) it is not built.
        self.final_norm = (torch.nn.Parameter(torch.ones(d, dtype=dtype))
                           if vision.layers_used == vision.num_layers else None)
        self.encoder = self.trunk(config, vision, use_te, qkv_bias=False)

    @staticmethod
    def trunk(config, vision: VisionConfig, use_te: bool, qkv_bias: bool) -> TransformerBlock:
        """The selected layers without layer scale and without a block-level final norm (the
        encoder applies its own final norm only when the last layer is selected)."""
        spec = layer_specs.vision_layer_spec(use_te, vision)
        spec.params = dict(spec.params, layer_scale_init=None, qkv_bias=qkv_bias)
        return TransformerBlock(
            config, TransformerBlockSubmodules(layer_specs=[spec] * vision.layers_used,
                                               layer_norm=None),
            post_layer_norm=False, pre_process=True, post_process=True)

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[1, grid_h*grid_w, d] positions; bicubic resize for other grids (transformers'
        non-native AIMv2 supports only the trained grid)."""
        pos = self.position_embedding
        n = round(pos.size(0) ** 0.5)
        if (grid_h, grid_w) == (n, n):
            return pos[None]
        grid = pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic",
                             align_corners=False).to(pos.dtype)
        return grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)

    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        """Patch embeddings, RMSNorm, + positions: [T, N, hidden]."""
        x = self.patch_embedding(tiles.to(self.patch_embedding.weight.dtype))
        gh, gw = x.shape[-2:]
        x = rms_norm(x.flatten(2).transpose(1, 2), self.patch_norm, self.vision.norm_eps)
        return x + self.positions(gh, gw)

    def finish(self, features: torch.Tensor) -> torch.Tensor:
        """The trunk's final RMSNorm when the last layer is selected (``last_hidden_state``);
        an earlier ``select_layer`` reads the un-normalized hidden state, as transformers does."""
        if self.vision.layers_used != self.vision.num_layers:
            return features
        return rms_norm(features, self.final_norm, self.vision.norm_eps)
