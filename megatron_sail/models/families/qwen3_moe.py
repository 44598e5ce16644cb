"""Qwen3-MoE decoders (the SAIL-VL2 mixture-of-experts language models): Qwen3 with routed experts.

Every decoder layer's SwiGLU is replaced by Megatron-Core's ``MoELayer``: a linear router over
``num_experts`` experts, top-k dispatch without token dropping, and small SwiGLU experts
(``moe_intermediate_size``). Routing follows transformers' ``Qwen3MoeSparseMoeBlock``: softmax
over all experts, keep the top k, renormalize them when ``norm_topk_prob``; in Megatron terms
that is "top-k, then softmax over the k" (``moe_router_pre_softmax=False``) for the renormalized
case and "softmax, then top-k" (``pre_softmax=True``) otherwise. The load-balancing loss is
Megatron's ``aux_loss`` with Qwen3-MoE's ``router_aux_loss_coef``. Experts are split over the
expert-parallel ranks (``ParallelConfig.ep``). HF side: ``Qwen3MoeForCausalLM`` (model_type
"qwen3_moe"); on disk each expert is three tensors ``mlp.experts.{e}.{gate,up,down}_proj``
(what ``save_pretrained`` writes and ``key_map`` uses), while transformers 5.x holds them fused in
memory (``mlp.experts.gate_up_proj`` [E, 2I, H] with [gate; up] per expert, ``down_proj``
[E, H, I]): ``to_transformers_params`` / ``from_transformers_params`` convert between the two.
"""

from __future__ import annotations

import torch

from megatron_sail.models.families.base import KeyMap
from megatron_sail.models.families.qwen2 import rope_theta
from megatron_sail.models.families.qwen3 import Qwen3Family


class Qwen3MoeFamily(Qwen3Family):
    """Qwen3-MoE spec: Qwen3 attention, a routed MoE in every layer."""

    name = "qwen3_moe"
    hf_model_type = "qwen3_moe"
    hf_architecture = "Qwen3MoeForCausalLM"

    def transformer_config_kwargs(self, lm) -> dict:
        """Qwen3's attention plus Megatron-Core's MoE fields (dropless; logits in the model dtype, as transformers computes them)."""
        if not lm.is_moe:
            raise ValueError(f"{self.name}: num_experts must be > 0 (got {lm.num_experts})")
        return dict(
            super().transformer_config_kwargs(lm),
            num_moe_experts=lm.num_experts,
            moe_ffn_hidden_size=lm.expert_ffn_hidden_size,
            moe_router_topk=lm.moe_router_topk,
            moe_router_pre_softmax=not lm.moe_norm_topk_prob,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=lm.moe_aux_loss_coeff,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
        )

    def flops_fields(self, lm) -> dict:
        """Active work per token: k experts' SwiGLU plus the router (E x hidden)."""
        return dict(
            super().flops_fields(lm),
            lm_ffn=lm.moe_router_topk * lm.expert_ffn_hidden_size,
            lm_experts=lm.num_experts,
        )

    def hf_config(self, lm) -> dict:
        """transformers Qwen3MoeConfig fields (every layer sparse, no dense-only layers)."""
        return dict(
            super().hf_config(lm),
            model_type=self.hf_model_type,
            num_experts=lm.num_experts,
            num_experts_per_tok=lm.moe_router_topk,
            moe_intermediate_size=lm.expert_ffn_hidden_size,
            norm_topk_prob=lm.moe_norm_topk_prob,
            router_aux_loss_coef=lm.moe_aux_loss_coeff,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )

    def from_hf_config(self, t, tied: bool):
        """LanguageConfig of a Qwen3MoeConfig; layouts with dense layers are refused."""
        import dataclasses

        if getattr(t, "mlp_only_layers", None) or getattr(t, "decoder_sparse_step", 1) != 1:
            raise ValueError(
                "qwen3_moe text configs with dense layers (mlp_only_layers / "
                "decoder_sparse_step != 1) are not supported"
            )
        base = super().from_hf_config(t, tied)
        return dataclasses.replace(
            base,
            family=self.name,
            rope_theta=rope_theta(t),
            num_experts=int(t.num_experts),
            moe_ffn_hidden_size=int(t.moe_intermediate_size),
            moe_router_topk=int(t.num_experts_per_tok),
            moe_norm_topk_prob=bool(getattr(t, "norm_topk_prob", True)),
            moe_aux_loss_coeff=float(getattr(t, "router_aux_loss_coef", 0.001)),
        )

    def layer_key_map(self, lm, o: str, h: str) -> KeyMap:
        """Qwen3's attention and norms; the router and each expert's SwiGLU instead of the MLP."""
        km = super().layer_key_map(lm, o, h)
        dense = {o + "mlp.linear_fc2.weight"}
        km.copies = [c for c in km.copies if c[0] not in dense]
        km.concat = [c for c in km.concat if not c[0].startswith(o + "mlp.")]
        km.copies.append((o + "mlp.router.weight", h + "mlp.gate.weight"))
        for e in range(lm.num_experts):
            ours, hf = f"{o}mlp.experts.local_experts.{e}.", f"{h}mlp.experts.{e}."
            km.copies.append((ours + "linear_fc2.weight", hf + "down_proj.weight"))
            km.concat.append((ours + "linear_fc1.weight", (hf + "gate_proj.weight", hf + "up_proj.weight")))
        return km

    def to_transformers_params(self, lm, state: dict, hf: str) -> dict:
        """Per-expert checkpoint tensors -> transformers' fused ``gate_up_proj`` / ``down_proj``
        (stacked in expert order; gate rows before up rows, as its forward chunks them)."""
        out = dict(state)
        for i in range(lm.num_layers):
            h = f"{hf}layers.{i}.mlp.experts."

            def take(e: int, w: str):
                key = f"{h}{e}.{w}_proj.weight"  # noqa: B023 - take runs in this iteration
                if key not in out:
                    raise KeyError(f"HF state dict is missing {key!r}")
                return out.pop(key)

            experts = range(lm.num_experts)
            out[h + "gate_up_proj"] = torch.stack(
                [torch.cat([take(e, "gate"), take(e, "up")], 0) for e in experts]
            )
            out[h + "down_proj"] = torch.stack([take(e, "down") for e in experts])
        return out

    def from_transformers_params(self, lm, state: dict, hf: str) -> dict:
        """transformers' fused expert parameters -> one gate/up/down tensor per expert."""
        out = dict(state)
        for i in range(lm.num_layers):
            h = f"{hf}layers.{i}.mlp.experts."
            for name in ("gate_up_proj", "down_proj"):
                if h + name not in out:
                    raise KeyError(f"transformers state dict is missing {h + name!r}")
            gate_up, down = out.pop(h + "gate_up_proj"), out.pop(h + "down_proj")
            for e in range(lm.num_experts):
                gate, up = gate_up[e].chunk(2, 0)
                out[f"{h}{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{h}{e}.up_proj.weight"] = up.contiguous()
                out[f"{h}{e}.down_proj.weight"] = down[e].contiguous()
        return out
