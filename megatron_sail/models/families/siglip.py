"""SigLIP / SigLIP2 (fixed resolution) vision encoders: transformers' ``SiglipVisionModel``.

Module: ``models/vit.py``'s ViTEncoder, configured by ``SigLIPFamily.encoder``. Geometry: no class
token; grid = tile / patch (27x27 for SigLIP-so400m-patch14-384, which the 2x2 pixel shuffle merges
only with ``ProjectorConfig.odd_grid="pad"``). The attention-pooling head (``head.*``) is not part
of a VLM encoder and is not built. transformers has no VLM class that holds a SigLIP tower beside
InternVL's projector (InternVL's container drops a class token SigLIP does not have), so the HF
side of this family is the encoder alone (``key_map`` names relative to ``SiglipVisionModel``).
"""

from __future__ import annotations

from megatron_sail.models.families.base import EncoderSpec, KeyMap, QKVSite, VisionFamily


class SigLIPFamily(VisionFamily):
    """SigLIP spec: how to build, count, map and tile it."""

    name = "siglip"
    hf_model_type = "siglip_vision_model"
    hf_final_norm = ("post_layernorm.",)
    hf_never_built = ("head.",)
    in_internvl_container = False
    vlm_export = False

    encoder = EncoderSpec(
        final_norm="layer_norm",
        normalization="LayerNorm",
        linear_bias=True,
        qkv_bias=True,
        qk_norm=False,
        activation="gelu_tanh",
        requires=(("norm_type", "layer_norm"), ("qkv_bias", True), ("qk_norm", False)),
        requires_text="SigLIP (LayerNorm, q/k/v bias, no QK-norm)",
    )
    """Patch conv (with bias) + positions (no class token); pre-LN layers with biases
    everywhere and a GELU-tanh MLP; ``post_layernorm`` when the last layer is selected. A
    VisionConfig with RMSNorm, no q/k/v bias or QK-norm is refused, not ignored."""

    def hf_config(self, v) -> dict:
        """transformers SiglipVisionConfig fields (no pooling head)."""
        return dict(
            model_type=self.hf_model_type,
            hidden_size=v.hidden_size,
            intermediate_size=v.ffn_hidden_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            layer_norm_eps=v.norm_eps,
            hidden_act="gelu_pytorch_tanh",
            vision_use_head=False,
        )

    def from_hf_config(self, v, select_layer: int, drop_path_rate: float = 0.0):
        """VisionConfig of a SiglipVisionConfig (the head flag is irrelevant: never built)."""
        if getattr(v, "hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"siglip hidden_act {v.hidden_act!r} is not supported (gelu_pytorch_tanh only)")
        if getattr(v, "num_channels", 3) != 3:
            raise ValueError(f"siglip num_channels {v.num_channels} is not supported (3 only)")
        return self.vision_config(
            v,
            select_layer,
            drop_path_rate,
            norm_type="layer_norm",
            norm_eps=v.layer_norm_eps,
            qkv_bias=True,
            qk_norm=False,
        )

    def key_map(self, v, ours: str, hf: str) -> KeyMap:
        """Embeddings, LayerNorms, attention (q/k/v fused) and MLP per layer, post_layernorm."""
        km = KeyMap(
            copies=[
                (ours + "patch_embedding.weight", hf + "embeddings.patch_embedding.weight"),
                (ours + "patch_embedding.bias", hf + "embeddings.patch_embedding.bias"),
                (ours + "position_embedding", hf + "embeddings.position_embedding.weight"),
            ]
        )
        wb = ("weight", "bias")
        if v.layers_used == v.num_layers:
            km.copies += [(ours + f"final_norm.{w}", hf + f"post_layernorm.{w}") for w in wb]
        for i in range(v.layers_used):
            o, h = f"{ours}encoder.layers.{i}.", f"{hf}{self.hf_layers}.{i}."
            for w in wb:
                km.copies += [
                    (o + f"input_layernorm.{w}", h + f"layer_norm1.{w}"),
                    (o + f"pre_mlp_layernorm.{w}", h + f"layer_norm2.{w}"),
                    (o + f"self_attention.linear_proj.{w}", h + f"self_attn.out_proj.{w}"),
                    (o + f"mlp.linear_fc1.{w}", h + f"mlp.fc1.{w}"),
                    (o + f"mlp.linear_fc2.{w}", h + f"mlp.fc2.{w}"),
                ]
            km.qkv.append(
                QKVSite(
                    o + "self_attention.linear_qkv.", h + "self_attn.{}_proj.", v.num_heads, v.num_heads, True
                )
            )
        return km
