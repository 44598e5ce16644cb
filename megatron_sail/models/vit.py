"""The vision encoder on Megatron-Core, one module for every vision family, built from parts:

- patch embedding: a conv (patch x patch, stride patch) with an optional class token before
  the patches and an optional RMSNorm on the patch embeddings;
- position embedding: a learned absolute table, resized bicubically for other tile sizes;
- trunk: a Megatron TransformerBlock of ``ViTLayer``s (models/vit_layer.py: optional layer
  scale, drop path);
- an optional final norm, applied when the last layer feeds the projector.

Which parts, and the layers' norm, biases, MLP gating and activation, come from the family's
``EncoderSpec`` (models/families/): InternViT, AIMv2 and SigLIP are configurations of this one
``ViTEncoder``. Features come from a chosen layer (``VisionConfig.select_layer``); only the layers
up to it are built.

Tiles run as a batch in Megatron's [s, b, h] layout. With sequence parallelism the token axis
(class token + patches) is padded to a multiple of the TP size and split across TP ranks, and in
FP8 (--fp8-vit) to a multiple of 16 tokens per rank; padded keys are masked out of attention, so
padding never changes the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sail.config.model import VisionConfig
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.models import layer_specs
from megatron_sail.models.encoder_spec import EncoderSpec
from megatron_sail.models.families import vision_family
from megatron_sail.models.portable import portable_settings


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (transformers' ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "silu": F.silu}
"""``EncoderSpec.activation`` names -> functions."""


def encoder_transformer_config(
    v: VisionConfig, parallel: ParallelConfig, dtype: torch.dtype, spec: EncoderSpec
) -> TransformerConfig:
    """The encoder's TransformerConfig: widths, parallelism and dtype from the VisionConfig, no
    fusions, the whole encoder on pipeline stage 0; norm, biases, MLP gating, activation and
    QK-norm from the family's spec (or, where it leaves them open, the VisionConfig)."""
    norm = spec.normalization or ("RMSNorm" if v.norm_type == "rms_norm" else "LayerNorm")
    return TransformerConfig(
        num_layers=v.layers_used,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_heads,
        ffn_hidden_size=v.ffn_hidden_size,
        kv_channels=v.hidden_size // v.num_heads,
        layernorm_epsilon=v.norm_eps,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=1,
        sequence_parallel=parallel.sequence_parallel,
        **portable_settings(dtype),
        normalization=norm,
        add_bias_linear=spec.linear_bias,
        add_qkv_bias=v.qkv_bias if spec.qkv_bias is None else spec.qkv_bias,
        gated_linear_unit=spec.gated_mlp,
        activation_func=ACTIVATIONS[spec.activation],
        qk_layernorm=v.qk_norm if spec.qk_norm is None else spec.qk_norm,
    )


def check_vision(v: VisionConfig, spec: EncoderSpec, family: str) -> None:
    """Refuse VisionConfig fields the family has no place for, rather than ignoring them."""
    wrong = [f"{name}={getattr(v, name)!r}" for name, want in spec.requires if getattr(v, name) != want]
    if wrong:
        raise ValueError(f"{family} vision family: {', '.join(wrong)} is not {spec.requires_text}")


FP8_TOKEN_ALIGN = 16
"""Tokens per rank and tile that the ViT's FP8 GEMMs get: Transformer Engine needs the token
count divisible by 8 (and the hidden size by 16; 16 keeps both kinds of dimension aligned)."""


def token_padding(tokens: int, tp: int, fp8: bool) -> int:
    """Masked padding tokens appended to each tile's sequence: up to a multiple of the TP size
    under sequence parallelism (the split), and, in FP8, up to FP8_TOKEN_ALIGN tokens per rank
    (a 448 px tile has 1,025 tokens: 1,024 patches and the class token)."""
    multiple = tp * (FP8_TOKEN_ALIGN if fp8 else 1)
    return (-tokens) % multiple


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, returned in the input dtype (as transformers' Aimv2RMSNorm)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def resize_positions(table: torch.Tensor, grid_h: int, grid_w: int, class_tokens: int) -> torch.Tensor:
    """Positions [1, class_tokens + grid_h * grid_w, d] from a learned table ([1, c + n*n, d]
    or [n*n, d]): the patch part resized bicubically when the grid is not the trained n x n (as
    InternVL and transformers' ``interpolate_pos_encoding``); class positions kept."""
    pos = table if table.dim() == 3 else table[None]
    n = round((pos.size(1) - class_tokens) ** 0.5)
    if (grid_h, grid_w) == (n, n):
        return pos
    patch = pos[:, class_tokens:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False).to(
        pos.dtype
    )
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
    return torch.cat([pos[:, :class_tokens], patch], 1) if class_tokens else patch


def vit_trunk(
    config: TransformerConfig, vision: VisionConfig, spec: EncoderSpec, use_te: bool
) -> TransformerBlock:
    """The selected layers (layer scale and q/k/v bias per the spec), without a block-level
    final norm: the encoder applies its own, only when the last layer is selected."""
    layer = layer_specs.vision_layer_spec(use_te, vision)
    layer.params = dict(
        layer.params,
        layer_scale_init=vision.layer_scale_init if spec.layer_scale else None,
        qkv_bias=vision.qkv_bias if spec.qkv_bias is None else spec.qkv_bias,
    )
    return TransformerBlock(
        config,
        TransformerBlockSubmodules(layer_specs=[layer] * vision.layers_used, layer_norm=None),
        post_layer_norm=False,
        pre_process=True,
        post_process=True,
    )


class ViTEncoder(MegatronModule):
    """Tiles [T, 3, H, W] -> patch features [T, (H/p)*(W/p), hidden] (class token dropped).

    Parameters (their names are the checkpoint keys the families' key maps use):
    ``patch_embedding`` (conv), ``class_embedding`` (with a class token), ``patch_norm`` (with a
    patch norm), ``position_embedding``, ``final_norm`` (with a final norm and the last layer
    selected), ``encoder`` (the trunk)."""

    def __init__(
        self,
        vision: VisionConfig,
        parallel: ParallelConfig,
        dtype: torch.dtype = torch.float32,
        use_te: bool = False,
        spec: EncoderSpec | None = None,
        family: str | None = None,
    ):
        if spec is None:
            family = family or vision.family
            spec = vision_family(family).encoder
        check_vision(vision, spec, family or vision.family)
        config = encoder_transformer_config(vision, parallel, dtype, spec)
        super().__init__(config=config)
        self.vision, self.spec = vision, spec
        self.class_tokens = int(spec.class_token)  # put before the patches, dropped at the end
        d, grid = vision.hidden_size, vision.image_size // vision.patch_size
        p = vision.patch_size
        self.patch_embedding = torch.nn.Conv2d(3, d, p, p, dtype=dtype)
        self.class_embedding = (
            torch.nn.Parameter(torch.zeros(1, 1, d, dtype=dtype)) if spec.class_token else None
        )
        self.patch_norm = torch.nn.Parameter(torch.ones(d, dtype=dtype)) if spec.patch_norm else None
        table = (1, grid * grid + 1, d) if spec.class_token else (grid * grid, d)
        self.position_embedding = torch.nn.Parameter(torch.zeros(*table, dtype=dtype))
        self.final_norm = (
            self._final_norm(spec.final_norm, d, dtype) if vision.layers_used == vision.num_layers else None
        )
        self.encoder = vit_trunk(config, vision, spec, use_te)

    def _final_norm(self, kind: str, d: int, dtype: torch.dtype):
        """The final norm's weights: a bare RMSNorm weight, an nn.LayerNorm, or None."""
        if kind == "rms_norm":
            return torch.nn.Parameter(torch.ones(d, dtype=dtype))
        if kind == "layer_norm":
            return torch.nn.LayerNorm(d, eps=self.vision.norm_eps, dtype=dtype)
        if kind != "none":
            raise ValueError(f"EncoderSpec.final_norm {kind!r}: expected none, rms_norm or layer_norm")
        return None

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a grid_h x grid_w patch grid (bicubic resize when it differs)."""
        return resize_positions(self.position_embedding, grid_h, grid_w, self.class_tokens)

    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        """(Class token +) patch embeddings (patch-normed) + positions: [T, c + N, hidden]."""
        x = self.patch_embedding(tiles.to(self.patch_embedding.weight.dtype))
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        if self.patch_norm is not None:
            x = rms_norm(x, self.patch_norm, self.vision.norm_eps)
        if self.class_embedding is not None:
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
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        return self.finish(x[self.class_tokens : s].transpose(0, 1))

    def finish(self, features: torch.Tensor) -> torch.Tensor:
        """The final norm when it is built (the last layer selected: ``last_hidden_state``); an
        earlier ``select_layer`` reads the un-normalized hidden state, as transformers does."""
        if self.final_norm is None:
            return features
        if isinstance(self.final_norm, torch.nn.Parameter):
            return rms_norm(features, self.final_norm, self.vision.norm_eps)
        return self.final_norm(features)

    def set_input_tensor(self, tensor):
        """The ViT always starts from tiles on the first stage; nothing comes from a pipeline."""
