"""Qwen2 / Qwen2.5 decoders: the SAIL-VL(-2B/8B) language models.

Megatron-Core ``GPTModel``: RMSNorm, SwiGLU, RoPE, GQA, bias on q/k/v only. HF side:
transformers' ``Qwen2ForCausalLM`` (``model_type`` "qwen2") as InternVL's text model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_sail.models.families.base import KeyMap, LanguageFamily, QKVSite
from megatron_sail.models.portable import portable_settings


def rope_theta(text) -> float:
    """RoPE base from a transformers text config (5.x rope_parameters or legacy rope_theta)."""
    params = getattr(text, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(text, "rope_theta", 10000.0))


class Qwen2Family(LanguageFamily):
    """Qwen2 spec: how to build, count and map it."""

    name = "qwen2"
    hf_model_type = "qwen2"
    hf_architecture = "Qwen2ForCausalLM"

    def transformer_config_kwargs(self, lm) -> dict:
        """The architecture part of the TransformerConfig (subclasses add to it)."""
        return dict(
            num_layers=lm.num_layers,
            hidden_size=lm.hidden_size,
            num_attention_heads=lm.num_heads,
            num_query_groups=lm.num_kv_heads,
            ffn_hidden_size=lm.ffn_hidden_size,
            kv_channels=lm.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=lm.norm_eps,
            add_bias_linear=False,
            add_qkv_bias=lm.qkv_bias,
            gated_linear_unit=True,
            activation_func=F.silu,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )

    def transformer_config(self, lm, parallel, dtype=torch.float32):
        """Megatron TransformerConfig under the given parallel layout (fusions off: portable)."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        return TransformerConfig(
            **self.transformer_config_kwargs(lm),
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            virtual_pipeline_model_parallel_size=parallel.vpp,
            expert_model_parallel_size=parallel.ep,
            num_layers_in_first_pipeline_stage=parallel.first_stage_layers if parallel.pp > 1 else None,
            num_layers_in_last_pipeline_stage=parallel.last_stage_layers if parallel.pp > 1 else None,
            sequence_parallel=parallel.sequence_parallel,
            **portable_settings(dtype),
            cross_entropy_loss_fusion=False,
        )

    def flops_fields(self, lm) -> dict:
        """GQA attention with lm.head_dim per head, SwiGLU (three matrices), LM head."""
        return dict(
            lm_hidden=lm.hidden_size,
            lm_layers=lm.num_layers,
            lm_heads=lm.num_heads,
            lm_kv_heads=lm.num_kv_heads,
            lm_head_dim=lm.head_dim,
            lm_ffn=lm.ffn_hidden_size,
            vocab_size=lm.vocab_size,
            lm_gated_mlp=True,
        )

    def hf_fields(self, lm) -> dict:
        """The transformers config fields Qwen2 and its descendants spell the same way."""
        return dict(
            model_type=self.hf_model_type,
            vocab_size=lm.vocab_size,
            hidden_size=lm.hidden_size,
            intermediate_size=lm.ffn_hidden_size,
            num_hidden_layers=lm.num_layers,
            num_attention_heads=lm.num_heads,
            num_key_value_heads=lm.num_kv_heads,
            rms_norm_eps=lm.norm_eps,
            max_position_embeddings=lm.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta},
            tie_word_embeddings=lm.tie_embeddings,
            hidden_act="silu",
        )

    def hf_config(self, lm) -> dict:
        """transformers Qwen2Config fields."""
        if lm.head_dim * lm.num_heads != lm.hidden_size:
            raise ValueError(
                f"{self.name}: head_dim {lm.head_dim} x {lm.num_heads} heads must equal "
                f"hidden_size {lm.hidden_size} (Qwen2 has no separate head_dim)"
            )
        return self.hf_fields(lm)

    def language_config(self, t, tied: bool, **fields):
        """LanguageConfig of a Qwen2-style HF text config, plus the family's ``fields``."""
        from megatron_sail.config.model import LanguageConfig

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
            **fields,
        )

    def from_hf_config(self, t, tied: bool):
        """LanguageConfig of a Qwen2Config (Qwen2 always has q/k/v biases)."""
        return self.language_config(t, tied, qkv_bias=True)

    def layer_key_map(self, lm, o: str, h: str) -> KeyMap:
        """One decoder layer: norms, attention (q/k/v fused), SwiGLU (gate/up fused)."""
        return KeyMap(
            copies=[
                (o + "input_layernorm.weight", h + "input_layernorm.weight"),
                (o + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight"),
                (o + "self_attention.linear_proj.weight", h + "self_attn.o_proj.weight"),
                (o + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight"),
            ],
            qkv=[
                QKVSite(
                    o + "self_attention.linear_qkv.",
                    h + "self_attn.{}_proj.",
                    lm.num_heads,
                    lm.num_kv_heads,
                    lm.qkv_bias,
                )
            ],
            concat=[(o + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"))],
        )

    def key_map(self, lm, ours: str, hf: str, hf_head: str) -> KeyMap:
        """Embedding, every layer, final norm and the (possibly tied) output layer."""
        km = KeyMap(
            copies=[
                (ours + "embedding.word_embeddings.weight", hf + "embed_tokens.weight"),
                (ours + "decoder.final_layernorm.weight", hf + "norm.weight"),
            ]
        )
        if lm.tie_embeddings:
            km.aliases.append((hf_head, hf + "embed_tokens.weight"))
        else:
            km.copies.append((ours + "output_layer.weight", hf_head))
        for i in range(lm.num_layers):
            km += self.layer_key_map(lm, f"{ours}decoder.layers.{i}.", f"{hf}layers.{i}.")
        return km
