"""Qwen3 dense decoders (the SAIL-VL2 language models): Qwen2 plus per-head QK-norm.

Differences from Qwen2: RMSNorm over each head of q and k before RoPE (Megatron-Core's
``qk_layernorm``), no q/k/v bias by default (``attention_bias``), and a head width that may
differ from hidden / heads (``head_dim`` -> Megatron's ``kv_channels``). HF side:
transformers' ``Qwen3ForCausalLM`` (``model_type`` "qwen3"), also as InternVL's text model.
"""

from __future__ import annotations

from megatron_sail.models.families.base import KeyMap
from megatron_sail.models.families.qwen2 import Qwen2Family, rope_theta


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
            model_type=self.hf_model_type,
            vocab_size=lm.vocab_size,
            hidden_size=lm.hidden_size,
            intermediate_size=lm.ffn_hidden_size,
            num_hidden_layers=lm.num_layers,
            num_attention_heads=lm.num_heads,
            num_key_value_heads=lm.num_kv_heads,
            head_dim=lm.head_dim,
            attention_bias=lm.qkv_bias,
            rms_norm_eps=lm.norm_eps,
            max_position_embeddings=lm.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta},
            tie_word_embeddings=lm.tie_embeddings,
            hidden_act="silu",
            use_sliding_window=False,
        )

    def from_hf_config(self, t, tied: bool):
        """LanguageConfig of a Qwen3Config."""
        from megatron_sail.config.model import LanguageConfig

        if getattr(t, "use_sliding_window", False):
            raise ValueError("qwen3 text configs with use_sliding_window=True are not supported")
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return LanguageConfig(
            family=self.name,
            hidden_size=t.hidden_size,
            num_layers=t.num_hidden_layers,
            num_heads=t.num_attention_heads,
            num_kv_heads=t.num_key_value_heads,
            ffn_hidden_size=t.intermediate_size,
            vocab_size=t.vocab_size,
            norm_eps=t.rms_norm_eps,
            rope_theta=rope_theta(t),
            tie_embeddings=tied,
            max_position_embeddings=t.max_position_embeddings,
            qkv_bias=bool(getattr(t, "attention_bias", False)),
            kv_channels=int(head_dim),
        )

    def layer_key_map(self, lm, o: str, h: str) -> KeyMap:
        """Qwen2's layer map plus the per-head q/k norms."""
        km = super().layer_key_map(lm, o, h)
        km.copies += [
            (o + "self_attention.q_layernorm.weight", h + "self_attn.q_norm.weight"),
            (o + "self_attention.k_layernorm.weight", h + "self_attn.k_norm.weight"),
        ]
        return km
