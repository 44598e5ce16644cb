"""InternViT on Megatron-Core: patch embedding, class token, interpolated absolute positions,
a TransformerBlock of layer-scaled pre-norm layers, features from a chosen layer.

Tiles run as a batch in Megatron's [s, b, h] layout. With sequence parallelism the token axis
(class token + patches) is padded to a multiple of the TP size and split across TP ranks, and in
FP8 (--fp8-vit) to a multiple of 16 tokens per rank; padded keys are masked out of attention, so
padding never changes the result.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.random import get_data_parallel_rng_tracker_name
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_sail.config.model import VisionConfig
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.models import layer_specs


def encoder_transformer_config(v: VisionConfig, parallel: ParallelConfig, dtype: torch.dtype,
                               **family: object) -> TransformerConfig:
    """The TransformerConfig every vision family shares (widths, parallelism, dtype, no fusions;
    the whole encoder lives on pipeline stage 0); ``family`` sets what differs per family
    (norm, biases, MLP gating, activation, QK-norm)."""
    return TransformerConfig(
        num_layers=v.layers_used, hidden_size=v.hidden_size, num_attention_heads=v.num_heads,
        ffn_hidden_size=v.ffn_hidden_size, kv_channels=v.hidden_size // v.num_heads,
        layernorm_epsilon=v.norm_eps, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=1,
        sequence_parallel=parallel.sequence_parallel, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, pipeline_dtype=dtype,
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        **family,
    )


def vision_transformer_config(v: VisionConfig, parallel: ParallelConfig,
                              dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """InternViT: LayerNorm (or RMSNorm), biased GELU MLP, optional QKV bias and QK-norm."""
    return encoder_transformer_config(
        v, parallel, dtype, normalization="RMSNorm" if v.norm_type == "rms_norm" else "LayerNorm",
        add_bias_linear=True, add_qkv_bias=v.qkv_bias, gated_linear_unit=False,
        activation_func=F.gelu, qk_layernorm=v.qk_norm)


FP8_TOKEN_ALIGN = 16
"""Tokens per rank and tile that the ViT's FP8 GEMMs get: Transformer Engine needs the token
count divisible by 8 (and the hidden size by 16; 16 keeps both kinds of dimension aligned)."""


def token_padding(tokens: int, tp: int, fp8: bool) -> int:
    """Masked padding tokens appended to each tile's sequence: up to a multiple of the TP size
    under sequence parallelism (the split), and, in FP8, up to FP8_TOKEN_ALIGN tokens per rank
    (a 448 px tile has 1,025 tokens: 1,024 patches and the class token)."""
    multiple = tp * (FP8_TOKEN_ALIGN if fp8 else 1)
    return (-tokens) % multiple


def _tp_shared_rng():
    """An RNG stream that is the same on every tensor-parallel rank: Megatron's
    "data-parallel" tracker state (seeded with the run seed on all ranks). Under sequence
    parallelism the TransformerBlock runs inside the per-TP-rank fork, where each rank would
    draw its own numbers. Without a seeded tracker (no parallel run) the current stream serves."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    name = get_data_parallel_rng_tracker_name()
    return tracker.fork(name) if name in tracker.get_states() else nullcontext()


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole tiles (batch dim 1 of [s, b, h]) with probability p.

    The decisions come from a stream shared by the TP ranks, so that under sequence
    parallelism every rank's slice of a tile is dropped or kept together."""
    if not training or p == 0.0:
        return x
    with _tp_shared_rng():
        keep = x.new_empty(1, x.size(1), 1).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class ViTLayer(TransformerLayer):
    """TransformerLayer with InternViT's layer scale (ls1, ls2) and drop path on both branches.

    Both live in the layer's bias-dropout-add step: residual + drop_path(ls * (out + bias)).
    """

    def __init__(self, config, submodules, layer_number=1, hidden_dropout=None,
                 pg_collection=None, vp_stage=None, layer_scale_init=0.1, drop_path_rate=0.0,
                 total_layers=1, qkv_bias=True):
        super().__init__(config, submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection,
                         vp_stage=vp_stage)
        def scale():
            p = torch.nn.Parameter(torch.full((config.hidden_size,), float(layer_scale_init),
                                              dtype=config.params_dtype))
            p.sequence_parallel = config.sequence_parallel  # per-token op: sum grads over TP
            return p
        # layer_scale_init=None: no layer scale (AIMv2-style layers), drop path still applies
        self.ls1, self.ls2 = (None, None) if layer_scale_init is None else (scale(), scale())
        steps = max(total_layers - 1, 1)
        self.drop_path_rate = drop_path_rate * (self.layer_number - 1) / steps
        self.self_attn_bda = self._scaled_add(lambda: self.ls1)
        self.mlp_bda = self._scaled_add(lambda: self.ls2)
        if not qkv_bias:  # Megatron gives qkv a bias whenever other linears have one
            self.self_attention.linear_qkv.register_parameter("bias", None)
            if hasattr(self.self_attention.linear_qkv, "use_bias"):
                self.self_attention.linear_qkv.use_bias = False

    def _scaled_add(self, get_scale):
        """A bias-dropout-add replacement with the call contract TransformerLayer expects."""
        def factory(training, _fused):
            def add(out_with_bias, residual, _prob):
                out, bias = out_with_bias
                if bias is not None:
                    out = out + bias
                scale = get_scale()
                if scale is not None:
                    out = scale * out
                return residual + drop_path(out, self.drop_path_rate, training)
            return add
        return factory


class InternViT(MegatronModule):
    """Tiles [T, 3, H, W] -> patch features [T, (H/p)*(W/p), hidden] (class token dropped).

    Other encoders (aimv2.py) reuse the tile batching, SP padding and masking of ``forward`` by
    overriding ``embed`` / ``finish`` and setting ``class_tokens``."""

    class_tokens = 1
    """Tokens ``embed`` puts before the patches; ``forward`` drops them."""

    def __init__(self, vision: VisionConfig, parallel: ParallelConfig,
                 dtype: torch.dtype = torch.float32, use_te: bool = False):
        config = vision_transformer_config(vision, parallel, dtype)
        super().__init__(config=config)
        self.vision = vision
        d, grid = vision.hidden_size, vision.image_size // vision.patch_size
        self.patch_embedding = torch.nn.Conv2d(3, d, vision.patch_size, vision.patch_size, dtype=dtype)
        self.class_embedding = torch.nn.Parameter(torch.zeros(1, 1, d, dtype=dtype))
        self.position_embedding = torch.nn.Parameter(torch.zeros(1, grid * grid + 1, d, dtype=dtype))
        spec = layer_specs.vision_layer_spec(use_te, vision)
        self.encoder = TransformerBlock(
            config, TransformerBlockSubmodules(layer_specs=[spec] * vision.layers_used,
                                               layer_norm=None),
            post_layer_norm=False, pre_process=True, post_process=True)

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a grid_h x grid_w patch grid (bicubic resize when it differs)."""
        pos = self.position_embedding
        n = round((pos.size(1) - 1) ** 0.5)
        if (grid_h, grid_w) == (n, n):
            return pos
        patch = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch.float(), size=(grid_h, grid_w), mode="bicubic",
                              align_corners=False).to(pos.dtype)
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], 1)

    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        """Class token + patch embeddings + positions: [T, 1 + N, hidden]."""
        x = self.patch_embedding(tiles.to(self.patch_embedding.weight.dtype))
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.size(0), -1, -1), x], dim=1)
        return x + self.positions(gh, gw)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """Features of the selected layer, class token dropped: [T, N, hidden]."""
        if tiles.dim() != 4 or tiles.size(1) != 3:
            raise ValueError(f"tiles must be [T, 3, H, W], got {tuple(tiles.shape)}")
        p = self.vision.patch_size
        if tiles.size(2) % p or tiles.size(3) % p:
            raise ValueError(f"tile size {tuple(tiles.shape[2:])} is not a multiple of patch {p}")
        x = self.embed(tiles).transpose(0, 1).contiguous()  # [s, T, h]
        s, mask = x.size(0), None
        sp = self.config.sequence_parallel
        tp = parallel_state.get_tensor_model_parallel_world_size() if sp else 1
        pad = token_padding(s, tp, bool(self.config.fp8))
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
            mask = torch.zeros(1, 1, 1, s + pad, dtype=torch.bool, device=x.device)
            mask[..., s:] = True
        if sp:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        x = self.encoder(x, attention_mask=mask)
        if self.config.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False)
        return self.finish(x[self.class_tokens:s].transpose(0, 1))

    def finish(self, features: torch.Tensor) -> torch.Tensor:
        """Last step on the patch features [T, N, hidden] (InternViT: none)."""
        return features

    def set_input_tensor(self, tensor):
        """The ViT always starts from tiles on the first stage; nothing comes from a pipeline."""
