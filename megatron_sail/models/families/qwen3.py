"""Qwen3 dense decoders (the SAIL-VL2 language models): Qwen2 plus per-head QK-norm.

Differences from Qwen2: RMSNorm over each head of q and k before RoPE (Megatron-Core's
``qk_layernorm``), no q/k/v bias by default (``attention_bias``), and a head width that may
differ from hidden / heads (``head_dim`` -> Megatron's ``kv_channels``). HF side:
transformers' ``Qwen3ForCausalLM`` (``model_type`` "qwen3"), also as InternVL's text model.
"""

from __future__ import annotations

from megatron_sail.models.families.base import KeyMap
from megatron_sail.models.families.qwen2 import Qwen2Family


class Qwen3Family(Qwen2Family):
    """Qwen3 spec: the Qwen2 spec with QK-norm and a free head_dim."""

    name = "qwen3"
    hf_model_type = "qwen3"
    hf_architecture = "Qwen3ForCausalLM"

    def transformer_config_kwargs(self, lm) -> dict:
        """Per-head RMSNorm on q and k (same eps as the block norms)."""
        return dict(super().transformer_config_kwargs(lm), qk_layernorm=True)

    def hf_config(self, lm) -> dict:
        """transformers Qwen3Config fields (head_dim and attention_bias explicit)."""
        return dict(
            self.hf_fields(lm), head_dim=lm.head_dim, attention_bias=lm.qkv_bias, use_sliding_window=False
        )

    def from_hf_config(self, t, tied: bool):
        """LanguageConfig of a Qwen3Config."""
        if getattr(t, "use_sliding_window", False):
            raise ValueError("qwen3 text configs with use_sliding_window=True are not supported")
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return self.language_config(
            t, tied, qkv_bias=bool(getattr(t, "attention_bias", False)), kv_channels=int(head_dim)
        )

    def layer_key_map(self, lm, o: str, h: str) -> KeyMap:
        """Qwen2's layer map plus the per-head q/k norms."""
        km = super().layer_key_map(lm, o, h)
        km.copies += [
            (o + "self_attention.q_layernorm.weight", h + "self_attn.q_norm.weight"),
            (o + "self_attention.k_layernorm.weight", h + "self_attn.k_norm.weight"),
        ]
        return km
