"""InternViT (InternViT-300M-448px and its InternVL relatives): the SAIL-VL(-2B/8B) encoder.

Module: ``models/vit.py`` (layer-scaled pre-norm layers, class token, learned absolute
positions). HF side: transformers' ``InternVLVisionModel`` (``model_type`` "internvl_vision")
inside ``InternVLForConditionalGeneration``. Geometry: one class token, dropped after the encoder.
"""
from __future__ import annotations

import re

from megatron_sail.config.model import TokenGeometry
from megatron_sail.models.families.base import KeyMap, QKVSite, VisionFamily


def _pair(x) -> int:
    """Square side from an int or (h, w); non-square tiles are not supported."""
    if isinstance(x, (list, tuple)):
        if x[0] != x[1]:
            raise ValueError(f"non-square size {tuple(x)} is not supported")
        return int(x[0])
    return int(x)


class InternViTFamily(VisionFamily):
    """InternViT spec: how to build, count, map and tile it."""

    name = "internvit"
    hf_model_type = "internvl_vision"

    def transformer_config(self, vision, parallel, dtype):
        """GELU MLP with biases, LayerNorm or RMSNorm, optional full-width QK-norm."""
        from megatron_sail.models.vit import vision_transformer_config

        return vision_transformer_config(vision, parallel, dtype)

    def build(self, vision, parallel, dtype, use_te: bool):
        """The InternViT module (class token dropped from its output)."""
        from megatron_sail.models.vit import InternViT

        return InternViT(vision, parallel, dtype, use_te)

    def flops_fields(self, vision, geometry: TokenGeometry) -> dict:
        """Plain two-matrix GELU MLP; the class token runs through every layer."""
        return dict(vit_hidden=vision.hidden_size, vit_layers=vision.layers_used,
                    vit_ffn=vision.ffn_hidden_size, vit_tokens_per_tile=geometry.encoder_tokens,
                    vit_class_tokens=geometry.class_tokens,
                    patch_dim=3 * vision.patch_size * vision.patch_size, vit_gated_mlp=False)

    def hf_config(self, v) -> dict:
        """transformers InternVLVisionConfig fields (no final norm: use_mean_pooling)."""
        return dict(model_type=self.hf_model_type, hidden_size=v.hidden_size,
                    num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                    intermediate_size=v.ffn_hidden_size, attention_bias=v.qkv_bias,
                    use_qk_norm=v.qk_norm, norm_type=v.norm_type, layer_norm_eps=v.norm_eps,
                    image_size=v.image_size, patch_size=v.patch_size,
                    layer_scale_init_value=v.layer_scale_init, hidden_act="gelu",
                    use_mean_pooling=True)

    def from_hf_config(self, v, select_layer: int, drop_path_rate: float = 0.0):
        """VisionConfig of an InternVLVisionConfig (drop path is not part of HF configs)."""
        from megatron_sail.config.model import VisionConfig

        if not getattr(v, "use_mean_pooling", True):
            raise ValueError("vision configs with a final ViT LayerNorm (use_mean_pooling=False) "
                             "are not supported")
        return VisionConfig(
            family=self.name, hidden_size=v.hidden_size, num_layers=v.num_hidden_layers,
            num_heads=v.num_attention_heads, ffn_hidden_size=v.intermediate_size,
            patch_size=_pair(v.patch_size), image_size=_pair(v.image_size),
            norm_type=v.norm_type, norm_eps=v.layer_norm_eps, qkv_bias=v.attention_bias,
            qk_norm=v.use_qk_norm, layer_scale_init=float(v.layer_scale_init_value),
            drop_path_rate=drop_path_rate, select_layer=select_layer)

    def key_map(self, v, ours: str, hf: str) -> KeyMap:
        """Embeddings, layer scales, norms, attention and MLP of the layers we build."""
        km = KeyMap(copies=[
            (ours + "class_embedding", hf + "embeddings.cls_token"),
            (ours + "position_embedding", hf + "embeddings.position_embeddings"),
            (ours + "patch_embedding.weight", hf + "embeddings.patch_embeddings.projection.weight"),
            (ours + "patch_embedding.bias", hf + "embeddings.patch_embeddings.projection.bias"),
        ])
        norm_w = ("weight",) if v.norm_type == "rms_norm" else ("weight", "bias")
        for i in range(v.layers_used):
            o, h = f"{ours}encoder.layers.{i}.", f"{hf}encoder.layer.{i}."
            c = km.copies
            c += [(o + "ls1", h + "lambda_1"), (o + "ls2", h + "lambda_2")]
            c += [(o + f"input_layernorm.{w}", h + f"layernorm_before.{w}") for w in norm_w]
            c += [(o + f"pre_mlp_layernorm.{w}", h + f"layernorm_after.{w}") for w in norm_w]
            for w in ("weight", "bias"):
                c += [(o + f"self_attention.linear_proj.{w}", h + f"attention.projection_layer.{w}"),
                      (o + f"mlp.linear_fc1.{w}", h + f"mlp.fc1.{w}"),
                      (o + f"mlp.linear_fc2.{w}", h + f"mlp.fc2.{w}")]
            if v.qk_norm:
                c += [(o + "self_attention.q_layernorm.weight", h + "attention.q_norm.weight"),
                      (o + "self_attention.k_layernorm.weight", h + "attention.k_norm.weight")]
            km.qkv.append(QKVSite(o + "self_attention.linear_qkv.", h + "attention.{}_proj.",
                                  v.num_heads, v.num_heads, v.qkv_bias))
        return km

    def unused_hf(self, v, hf: str, key: str) -> bool:
        """HF layers after ``select_layer``: never computed, so we do not build them."""
        m = re.match(re.escape(hf) + r"encoder\.layer\.(\d+)\.", key)
        return bool(m) and v.layers_used <= int(m.group(1)) < v.num_layers
