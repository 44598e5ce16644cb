"""AIMv2 vision encoders (SAIL-VL-1.5-2B uses AIMv2-Huge): transformers' ``Aimv2VisionModel``.

Module: ``models/vit.py``'s ViTEncoder, configured by ``AIMv2Family.encoder``. Geometry: no class
token; grid = tile / patch. A grid the pixel shuffle cannot merge (27x27 patches for 378 px tiles
at patch 14 and merge 2) is refused with a clear error: the padding/cropping rule of the released
SAIL-VL models was not confirmed (``ProjectorConfig.odd_grid="pad"`` opts into Ovis2's zero
padding).
Only the released AIMv2 variant is supported: learned positions (not ``is_native``), no bias.
transformers has no VLM class that holds an AIMv2 tower beside InternVL's projector, so the HF
side of this family is the encoder alone (``key_map`` under the encoder's prefix).
"""

from __future__ import annotations

from megatron_sail.models.families.base import EncoderSpec, KeyMap, QKVSite, VisionFamily


class AIMv2Family(VisionFamily):
    """AIMv2 spec: how to build, count, map and tile it."""

    name = "aimv2"
    hf_model_type = "aimv2_vision_model"
    hf_final_norm = ("rms_norm.weight",)
    in_internvl_container = False

    encoder = EncoderSpec(
        patch_norm=True,
        final_norm="rms_norm",
        normalization="RMSNorm",
        linear_bias=False,
        qkv_bias=False,
        qk_norm=False,
        gated_mlp=True,
        activation="silu",
    )
    """Patch conv -> RMSNorm -> + positions (no class token); RMSNorm layers, bias-free
    attention, SwiGLU MLP; the final RMSNorm (``last_hidden_state``) when the last layer is
    selected."""

    def hf_config(self, v) -> dict:
        """transformers Aimv2VisionConfig fields (no pooling head)."""
        return dict(
            model_type=self.hf_model_type,
            hidden_size=v.hidden_size,
            intermediate_size=v.ffn_hidden_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            rms_norm_eps=v.norm_eps,
            qkv_bias=False,
            mlp_bias=False,
            use_head=False,
            is_native=False,
            hidden_act="silu",
        )

    def from_hf_config(self, v, select_layer: int, drop_path_rate: float = 0.0):
        """VisionConfig of an Aimv2VisionConfig; refuses the variants we do not build."""
        for flag in ("qkv_bias", "mlp_bias", "is_native"):
            if getattr(v, flag, False):
                raise ValueError(f"aimv2 vision config with {flag}=True is not supported")
        if getattr(v, "hidden_act", "silu") != "silu":
            raise ValueError(f"aimv2 hidden_act {v.hidden_act!r} is not supported (silu only)")
        return self.vision_config(
            v,
            select_layer,
            drop_path_rate,
            norm_type="rms_norm",
            norm_eps=v.rms_norm_eps,
            qkv_bias=False,
            qk_norm=False,
        )

    def key_map(self, v, ours: str, hf: str) -> KeyMap:
        """Embeddings, norms, attention (q/k/v fused) and SwiGLU (gate/up fused) per layer."""
        km = KeyMap(
            copies=[
                (ours + "patch_embedding.weight", hf + "embeddings.patch_embed.weight"),
                (ours + "patch_embedding.bias", hf + "embeddings.patch_embed.bias"),
                (ours + "patch_norm", hf + "embeddings.rms_norm.weight"),
                (ours + "position_embedding", hf + "embeddings.position_embedding.weight"),
            ]
        )
        if v.layers_used == v.num_layers:
            km.copies.append((ours + "final_norm", hf + "rms_norm.weight"))
        for i in range(v.layers_used):
            o, h = f"{ours}encoder.layers.{i}.", f"{hf}{self.hf_layers}.{i}."
            km.copies += [
                (o + "input_layernorm.weight", h + "rms_norm1.weight"),
                (o + "pre_mlp_layernorm.weight", h + "rms_norm2.weight"),
                (o + "self_attention.linear_proj.weight", h + "attention.out_proj.weight"),
                (o + "mlp.linear_fc2.weight", h + "ffn.down_proj.weight"),
            ]
            km.qkv.append(
                QKVSite(
                    o + "self_attention.linear_qkv.",
                    h + "attention.{}_proj.",
                    v.num_heads,
                    v.num_heads,
                    False,
                )
            )
            km.concat.append(
                (o + "mlp.linear_fc1.weight", (h + "ffn.gate_proj.weight", h + "ffn.up_proj.weight"))
            )
        return km
