"""InternViT (InternViT-300M-448px and its InternVL relatives): the SAIL-VL(-2B/8B) encoder.

Module: ``models/vit.py``'s ViTEncoder, configured by ``InternViTFamily.encoder`` (class token,
layer-scaled pre-norm layers, learned absolute positions). HF side: transformers'
``InternVLVisionModel`` (``model_type`` "internvl_vision") inside
``InternVLForConditionalGeneration``. Geometry: one class token, dropped after the encoder.
"""

from __future__ import annotations

from megatron_sail.models.families.base import EncoderSpec, KeyMap, QKVSite, VisionFamily


class InternViTFamily(VisionFamily):
    """InternViT spec: how to build, count, map and tile it."""

    name = "internvit"
    hf_model_type = "internvl_vision"
    hf_layers = "encoder.layer"

    encoder = EncoderSpec(class_token=True, layer_scale=True, linear_bias=True, activation="gelu")
    """Class token, layer scale, GELU MLP with biases; norm (LayerNorm or RMSNorm), q/k/v bias
    and full-width QK-norm as the VisionConfig says; no final norm (``use_mean_pooling``)."""

    def hf_config(self, v) -> dict:
        """transformers InternVLVisionConfig fields (no final norm: use_mean_pooling)."""
        return dict(
            model_type=self.hf_model_type,
            hidden_size=v.hidden_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            intermediate_size=v.ffn_hidden_size,
            attention_bias=v.qkv_bias,
            use_qk_norm=v.qk_norm,
            norm_type=v.norm_type,
            layer_norm_eps=v.norm_eps,
            image_size=v.image_size,
            patch_size=v.patch_size,
            layer_scale_init_value=v.layer_scale_init,
            hidden_act="gelu",
            use_mean_pooling=True,
        )

    def from_hf_config(self, v, select_layer: int, drop_path_rate: float = 0.0):
        """VisionConfig of an InternVLVisionConfig (drop path is not part of HF configs)."""
        if not getattr(v, "use_mean_pooling", True):
            raise ValueError(
                "vision configs with a final ViT LayerNorm (use_mean_pooling=False) are not supported"
            )
        return self.vision_config(
            v,
            select_layer,
            drop_path_rate,
            norm_type=v.norm_type,
            norm_eps=v.layer_norm_eps,
            qkv_bias=v.attention_bias,
            qk_norm=v.use_qk_norm,
            layer_scale_init=float(v.layer_scale_init_value),
        )

    def key_map(self, v, ours: str, hf: str) -> KeyMap:
        """Embeddings, layer scales, norms, attention and MLP of the layers we build."""
        km = KeyMap(
            copies=[
                (ours + "class_embedding", hf + "embeddings.cls_token"),
                (ours + "position_embedding", hf + "embeddings.position_embeddings"),
                (ours + "patch_embedding.weight", hf + "embeddings.patch_embeddings.projection.weight"),
                (ours + "patch_embedding.bias", hf + "embeddings.patch_embeddings.projection.bias"),
            ]
        )
        norm_w = ("weight",) if v.norm_type == "rms_norm" else ("weight", "bias")
        for i in range(v.layers_used):
            o, h = f"{ours}encoder.layers.{i}.", f"{hf}{self.hf_layers}.{i}."
            c = km.copies
            c += [(o + "ls1", h + "lambda_1"), (o + "ls2", h + "lambda_2")]
            c += [(o + f"input_layernorm.{w}", h + f"layernorm_before.{w}") for w in norm_w]
            c += [(o + f"pre_mlp_layernorm.{w}", h + f"layernorm_after.{w}") for w in norm_w]
            for w in ("weight", "bias"):
                c += [
                    (o + f"self_attention.linear_proj.{w}", h + f"attention.projection_layer.{w}"),
                    (o + f"mlp.linear_fc1.{w}", h + f"mlp.fc1.{w}"),
                    (o + f"mlp.linear_fc2.{w}", h + f"mlp.fc2.{w}"),
                ]
            if v.qk_norm:
                c += [
                    (o + "self_attention.q_layernorm.weight", h + "attention.q_norm.weight"),
                    (o + "self_attention.k_layernorm.weight", h + "attention.k_norm.weight"),
                ]
            km.qkv.append(
                QKVSite(
                    o + "self_attention.linear_qkv.",
                    h + "attention.{}_proj.",
                    v.num_heads,
                    v.num_heads,
                    v.qkv_bias,
                )
            )
        return km
