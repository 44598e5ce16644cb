"""Core attention on torch SDPA, for the local layer spec, with packed (THD) sequences.

Megatron-Core's own local core attention materializes an [s, s] score tensor per head and
rejects packed sequences; on an H200 that cost about half the step time (DESIGN.md). This
module hands the work to ``scaled_dot_product_attention`` (flash / memory-efficient kernels
on GPUs) and handles packing by running each packed segment on its own, so attention never
crosses a sample boundary and no [t, t] mask is ever built. Segments of equal length (the
unpacked case) run as one batched call.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


@dataclass
class SegmentedSeqParams(PackedSeqParams):
    """PackedSeqParams plus the boundaries as Python ints (read once per step, not per layer)."""

    bounds: tuple[int, ...] = ()
    """cu_seqlens as a tuple: [0, len0, len0+len1, ..., total]."""


def packed_seq_params(cu_seqlens: torch.Tensor) -> SegmentedSeqParams:
    """THD PackedSeqParams for Megatron from flattened cu_seqlens (int32, first 0)."""
    bounds = tuple(int(x) for x in cu_seqlens.tolist())
    if len(bounds) < 2 or bounds[0] != 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and strictly increase, got {list(bounds)[:16]}")
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    cu = cu_seqlens.to(torch.int32)
    return SegmentedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
        bounds=bounds,
    )


def _segments_sdpa(q, k, v, bounds, causal, dropout_p):
    """SDPA over each [a, b) segment of THD tensors q [t, np, hn], k/v [t, ng, hn]."""
    lengths = {b - a for a, b in zip(bounds, bounds[1:])}
    gqa = q.size(1) != k.size(1)
    if len(lengths) == 1:  # equal segments: one batched call
        n, L = len(bounds) - 1, lengths.pop()
        qs, ks, vs = (x[: n * L].view(n, L, x.size(1), x.size(2)).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=causal, dropout_p=dropout_p, enable_gqa=gqa
        )
        return out.transpose(1, 2).reshape(n * L, -1)
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, dropout_p=dropout_p, enable_gqa=gqa)
        outs.append(o.squeeze(0).transpose(0, 1).reshape(b - a, -1))
    return torch.cat(outs, dim=0)


class SDPAttention(MegatronModule):
    """Drop-in core attention (same constructor/forward contract as Megatron's DotProductAttention).

    Inputs are [s, b, np, hn] (sbhd) or [t, np, hn] (thd with ``packed_seq_params``); the output
    is [s, b, np*hn] or [t, np*hn]. ``attention_mask`` (sbhd only) follows Megatron's convention:
    True marks positions that must NOT be attended (used for the ViT's key padding).
    """

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type="self",
        attention_dropout=None,
        softmax_scale=None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        if softmax_scale is not None and abs(softmax_scale - head_dim**-0.5) > 1e-12:
            raise ValueError("SDPAttention supports only the default 1/sqrt(head_dim) scale")

    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        """Attention output, heads merged into the last dimension."""
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention_bias")
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        p = self.dropout if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 else nullcontext():
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                bounds = getattr(packed_seq_params, "bounds", None) or tuple(
                    packed_seq_params.cu_seqlens_q.tolist()
                )
                return _segments_sdpa(query, key, value, bounds, causal, p)
            return self._sbhd(query, key, value, attention_mask, causal, p)

    @staticmethod
    def _sbhd(q, k, v, mask, causal, p):
        """Batched [s, b, n, d] attention; mask is Megatron-style (True = masked out)."""
        qs, ks, vs = (x.permute(1, 2, 0, 3) for x in (q, k, v))
        allowed = None if mask is None else ~mask
        out = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            attn_mask=allowed,
            dropout_p=p,
            is_causal=causal and mask is None,
            enable_gqa=qs.size(1) != ks.size(1),
        )
        s, b = q.size(0), q.size(1)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
