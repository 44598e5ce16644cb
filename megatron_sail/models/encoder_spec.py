"""Which parts the one vision encoder (models/vit.py's ``ViTEncoder``) is built from: a vision
family (models/families/) is a configuration of that encoder, given as an ``EncoderSpec``.

A module of its own, importing nothing of the project: the encoder reads it, the families fill
it, and neither has to import the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderSpec:
    """Which parts ``models/vit.py``'s ``ViTEncoder`` is built from, and the layer settings of
    its TransformerConfig: a vision family is a configuration of the one encoder, not a class.

    ``None`` in a layer field means "as the VisionConfig says" (InternViT leaves its norm, q/k/v
    bias and QK-norm to the checkpoint); a value fixes it for the family."""

    class_token: bool = False
    """A learned class token before the patches (InternViT); its position table is then
    [1, 1 + N, d] (InternVL's parameter), else [N, d] (an embedding table)."""
    patch_norm: bool = False
    """RMSNorm on the patch embeddings before the positions are added (AIMv2)."""
    final_norm: str = "none"
    """'none', 'rms_norm' (a bare weight, AIMv2) or 'layer_norm' (an nn.LayerNorm, SigLIP);
    built and applied only when the last layer feeds the projector (``last_hidden_state``)."""
    layer_scale: bool = False
    """ls1/ls2 layer scale from ``VisionConfig.layer_scale_init`` (InternViT)."""
    normalization: str | None = None
    """Megatron ``normalization`` ('LayerNorm' / 'RMSNorm'); None: ``VisionConfig.norm_type``."""
    linear_bias: bool = True
    """Biases on the attention output and MLP linears."""
    qkv_bias: bool | None = None
    """Bias on q/k/v; None: ``VisionConfig.qkv_bias``."""
    qk_norm: bool | None = None
    """InternViT's full-width QK-norm; None: ``VisionConfig.qk_norm``."""
    gated_mlp: bool = False
    """SwiGLU-style MLP (gate and up) rather than two matrices."""
    activation: str = "gelu"
    """MLP activation: 'gelu', 'gelu_tanh' or 'silu'."""
    requires: tuple[tuple[str, object], ...] = ()
    """(VisionConfig field, value) pairs the family has no place for otherwise: a config that
    differs is refused rather than ignored."""
    requires_text: str = ""
    """What ``requires`` means, in words (for the error)."""
