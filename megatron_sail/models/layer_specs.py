"""Layer specs: the ONE place that chooses Transformer Engine vs local (torch) modules.

* ``language_layer_spec(use_te, qk_norm)``: Qwen-style decoder layer (causal, GQA, SwiGLU,
  RMSNorm; per-head QK-norm for Qwen3).
* ``vision_layer_spec(use_te, vision)``: InternViT layer (bidirectional, GELU MLP, layer scale).

The local spec runs everywhere (CPU included): SDPA core attention with packed sequences
(attention.py) and norms that support sequence parallelism. The TE spec needs CUDA and
transformer-engine; it is imported only when asked for and tested only in tests/gpu/.
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_sail.compat.moe import ensure_router_gemm_fallback
from megatron_sail.compat.te import te_available  # noqa: F401 - callers ask the spec module
from megatron_sail.models.attention import SDPAttention
from megatron_sail.models.vit_layer import ViTLayer


class SPNorm(torch.nn.Module):
    """LayerNorm or RMSNorm (from ``config.normalization``) that works under sequence parallelism.

    torch's norms refuse SP in Megatron's local spec. The math is per token, so SP only needs
    the weights' gradients summed over the TP group: ``sequence_parallel = True`` on each
    parameter asks Megatron's grad finalization to do exactly that.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = (
            None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        )
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        """Normalize in fp32 (as transformers' Qwen2RMSNorm / nn.LayerNorm), return input dtype.

        In fp32, torch's ``rms_norm`` runs the very same ops (square, mean, + eps, rsqrt, scale,
        weight) in C++: bit-identical outputs and gradients, without five Python dispatches per
        call (a tenth of a tiny model's decode step). Other dtypes keep the explicit form, whose
        rounding transformers' norm shares."""
        if self.rms and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return torch.nn.functional.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        if self.rms:
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * h.to(x.dtype)
        return torch.nn.functional.layer_norm(x, (x.size(-1),), self.weight, self.bias, self.eps)


class SPFinalNorm(SPNorm):
    """The LM's final norm, with the (empty) ``_extra_state`` that TE's norm carries.

    In the TE spec the final norm is Transformer Engine's RMSNorm, whose checkpoint entry
    includes ``_extra_state`` (FP8 metadata); the layer norms inside the layers live in TE's
    fused linears, whose extra state Megatron's local linears already mirror. Without the same
    key here, a checkpoint written with the local spec (every conversion) would fail the strict
    load of the TE model's last pipeline stage."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(config, hidden_size, eps)
        # A state dict without the key (an older checkpoint) still loads strictly.
        self._register_load_state_dict_pre_hook(
            lambda state_dict, prefix, *_a, **_k: state_dict.setdefault(f"{prefix}_extra_state")
        )

    def get_extra_state(self):
        """Nothing to keep; present so that the checkpoint keys match TE's norm."""
        return None

    def set_extra_state(self, state) -> None:
        """TE's FP8 metadata (if any) has no meaning for this norm: ignored."""


class FullWidthQKNorm(torch.nn.Module):
    """InternViT's QK-norm: RMSNorm over all heads of q (or k) together, not per head.

    Heads are split over the TP group, so the mean square is summed across TP ranks with an
    autograd-aware all-reduce; each rank keeps only its heads' slice of the weight (saved with
    TP sharding metadata). The eps is fixed at 1e-6 as in InternVL.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        from megatron.core import parallel_state

        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.full = config.num_attention_heads * config.kv_channels
        self.eps = 1e-6
        self.weight = torch.nn.Parameter(torch.ones(self.full // self.tp, dtype=config.params_dtype))
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1

    def forward(self, x):
        """x: [s, b, heads_local, head_dim] -> same shape, normalized over the full width."""
        shape = x.shape
        h = x.reshape(*shape[:-2], -1).float()
        sq = h.pow(2).sum(-1, keepdim=True)
        if self.tp > 1:
            import torch.distributed.nn.functional as dnn

            sq = dnn.all_reduce(sq, group=self.tp_group)
        h = h * torch.rsqrt(sq / self.full + self.eps)
        return (self.weight * h.to(x.dtype)).reshape(shape)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Weight sharded along dim 0 across TP, like the q/k heads it scales."""
        sd = {"weight": self.weight}
        return make_sharded_tensors_for_checkpoint(sd, prefix, {"weight": 0}, sharded_offsets)


def _local_attention(mask_type, qk) -> ModuleSpec:
    """SelfAttention with torch linears, SDPA core attention and the given QK-norm module."""
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": mask_type},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=SDPAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=qk,
            k_layernorm=qk,
        ),
    )


def _local_mlp() -> ModuleSpec:
    """Two TP linears (the activation, GELU or SwiGLU, comes from the TransformerConfig)."""
    return ModuleSpec(
        module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    )


# Checkpoint keys of the local norms renamed to where the TE spec keeps the same weights (inside
# the fused linears), as Megatron's own local GPT spec does: a checkpoint saved with either spec
# loads into the other.
_TE_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def _moe(use_te: bool, num_experts: int) -> ModuleSpec:
    """Megatron-Core's MoELayer: a router and the routed experts (TE: grouped GEMM; local: one
    torch MLP per expert, which runs on CPU). Expert parallelism is the layer's own business."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    ensure_router_gemm_fallback()
    return get_moe_module_spec(use_te=use_te, num_experts=num_experts, moe_grouped_gemm=use_te)


def _local_layer(layer_cls, mask_type, qk, num_experts: int = 0) -> ModuleSpec:
    """Pre-norm transformer layer built only from modules that run on any device.

    With ``num_experts`` the MLP is a routed MoE; its norm stays a separate module in both specs
    (TE cannot fuse it into a router), so only the attention norm key is renamed."""
    keys = dict(_TE_NORM_KEYS)
    if num_experts:
        del keys["pre_mlp_layernorm."]
    return ModuleSpec(
        module=layer_cls,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SPNorm,
            self_attention=_local_attention(mask_type, qk),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SPNorm,
            mlp=_moe(False, num_experts) if num_experts else _local_mlp(),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys,
        ),
    )


def _te_layer(layer_cls, mask_type, qk, core_attention, num_experts: int = 0) -> ModuleSpec:
    """Same layer with TE fused norm+linear modules (norm weights live inside the linears;
    an MoE layer keeps its own pre-MLP TE norm)."""
    from megatron.core.extensions.transformer_engine import (
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    attn = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": mask_type},
        submodules=SelfAttentionSubmodules(
            linear_qkv=TELayerNormColumnParallelLinear,
            core_attention=core_attention,
            linear_proj=TERowParallelLinear,
            q_layernorm=qk,
            k_layernorm=qk,
        ),
    )
    if num_experts:
        return ModuleSpec(
            module=layer_cls,
            submodules=TransformerLayerSubmodules(
                self_attention=attn,
                self_attn_bda=get_bias_dropout_add,
                pre_mlp_layernorm=TENorm,
                mlp=_moe(True, num_experts),
                mlp_bda=get_bias_dropout_add,
            ),
        )
    mlp = ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear),
    )
    return ModuleSpec(
        module=layer_cls,
        submodules=TransformerLayerSubmodules(
            self_attention=attn, self_attn_bda=get_bias_dropout_add, mlp=mlp, mlp_bda=get_bias_dropout_add
        ),
    )


def language_layer_spec(use_te: bool, qk_norm: bool = False, num_experts: int = 0) -> ModuleSpec:
    """Decoder layer: causal attention (TE: fused THD kernels; local: SDPA), with ``qk_norm``
    an RMSNorm over each head of q and k (Qwen3; TE's norm or the SP-capable one), and with
    ``num_experts`` a routed MoE in place of the dense SwiGLU (Qwen3-MoE)."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention, TENorm

        return _te_layer(
            TransformerLayer,
            AttnMaskType.causal,
            TENorm if qk_norm else IdentityOp,
            TEDotProductAttention,
            num_experts,
        )
    return _local_layer(TransformerLayer, AttnMaskType.causal, SPNorm if qk_norm else IdentityOp, num_experts)


def vision_layer_spec(use_te: bool, vision) -> ModuleSpec:
    """InternViT layer: bidirectional attention with key padding, layer scale, drop path.

    Both specs use SDPA for the ViT's core attention (short, uniform sequences where SDPA's
    flash kernel is already the fast path), so the padding mask works the same everywhere.
    ``vision`` is the VisionConfig (layer scale, drop path, qkv bias, QK-norm).
    """
    qk = FullWidthQKNorm if vision.qk_norm else IdentityOp
    if use_te:
        spec = _te_layer(ViTLayer, AttnMaskType.no_mask, qk, SDPAttention)
    else:
        spec = _local_layer(ViTLayer, AttnMaskType.no_mask, qk)
    spec.params = {
        "layer_scale_init": vision.layer_scale_init,
        "drop_path_rate": vision.drop_path_rate,
        "total_layers": vision.num_layers,
        "qkv_bias": vision.qkv_bias,
    }
    return spec


def language_block_spec(config, use_te: bool, vp_stage=None) -> TransformerBlockSubmodules:
    """The LM's layers on this pipeline stage plus its final norm (SP-capable when local).

    Per-head QK-norm follows ``config.qk_layernorm`` and MoE ``config.num_moe_experts``, which
    the language family sets."""
    from megatron.core import parallel_state

    n = get_num_layers_to_build(
        config, vp_stage=vp_stage, pp_rank=parallel_state.get_pipeline_model_parallel_rank()
    )
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = SPFinalNorm
    return TransformerBlockSubmodules(
        layer_specs=[language_layer_spec(use_te, config.qk_layernorm, config.num_moe_experts or 0)] * n,
        layer_norm=final_norm,
    )
