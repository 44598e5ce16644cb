"""fp32 linear products on CPU through oneDNN's matmul instead of MKL's sgemm (generation, training).

``F.linear`` on a CPU tensor calls MKL's ``sgemm``. On this project's AMD EPYC machines MKL
runs fp32 products at about 40 GFLOP/s on one core at large sizes and far less at few rows,
where it first rearranges the whole weight on every call (the Qwen2.5-0.5B LM head at 8 rows:
2.2 GFLOP in 110 ms). oneDNN, which torch ships for its CPU backends, reads the same dense
weight with its own AVX2 kernels: 52 ms for that head, 1.5-2.4x at every shape of that model
from one row to a 2,280-token prefill (2-core VM, 2026-12-07, one thread, torch 2.13.0;
docs/performance.md). Below about four million multiply-adds its fixed cost (~12 us a call)
exceeds the gain, and for a single row below about eight million MKL's matrix-vector kernel
keeps up (the 0.5B MLP output projection: 0.52 vs 0.54 ms), so those products stay on
``F.linear``.

The result is the same product summed in another order: it differs from ``F.linear`` in the
last bits (about 1e-6 relative), as two BLAS builds do, so greedy tokens can in principle part
from transformers' at a near tie; the generation tests and tools/bench_generate.py check that
they do not.

Training: the op has no backward, so ``OneDNNLinear`` is an autograd function whose three
products (output, input gradient, weight gradient) each go through ``linear``, and the CPU
backend (cpu.py) puts it behind Megatron's ``linear_with_grad_accumulation_and_async_allreduce``
for the calls that are a plain product: no sequence-parallel gather, no input-gradient
all-reduce, no fused gradient accumulation, no deferred weight gradients (every other call,
e.g. under TP with SP, keeps Megatron's function).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

MIN_MACS = 1 << 22
"""Smallest product (rows x out x in multiply-adds) sent to oneDNN (below: F.linear is faster);
twice that for a single row."""


@functools.cache
def available() -> bool:
    """This torch build has oneDNN and its linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; through oneDNN for a large enough fp32 product on CPU."""
    rows = x.numel() // max(x.size(-1), 1)
    if (
        x.dtype is torch.float32
        and weight.dtype is torch.float32
        and x.device.type == "cpu"
        and rows * weight.numel() >= (MIN_MACS if rows > 1 else 2 * MIN_MACS)
        and available()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class OneDNNLinear(torch.autograd.Function):
    """y = x w^T + b with each of the three products through ``linear`` (forward and backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = linear(x.reshape(-1, x.size(-1)), weight, bias)
        # oneDNN hands a >2-D result back as a view, which callers could not modify in place
        # (Megatron's cross entropy does, on the logits): reshape outside autograd's view
        # tracking, as torch.matmul does
        return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], weight.size(0)))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = linear(grad, weight.t())  # [.., out] x [out, in]
        g2 = grad.reshape(-1, grad.size(-1))
        if ctx.needs_input_grad[1]:
            grad_w = linear(g2.t(), x.reshape(-1, x.size(-1)).t())  # [out, rows] x [rows, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


def plain_product(
    gradient_accumulation_fusion: bool,
    allreduce_dgrad: bool,
    sequence_parallel: bool,
    grad_output_buffer=None,
    wgrad_deferral_limit: Optional[int] = 0,
    async_grad_allreduce: Optional[bool] = None,
    tp_group=None,
) -> bool:
    """Megatron's linear call with these options (its parameters after input, weight, bias) is
    ``x w^T + b`` forward and the two plain gradient products backward (nothing gathered,
    reduced, fused or deferred)."""
    return not (
        gradient_accumulation_fusion
        or allreduce_dgrad
        or async_grad_allreduce
        or sequence_parallel
        or grad_output_buffer is not None
    )


def megatron_linear(original):
    """Megatron's ``linear_with_grad_accumulation_and_async_allreduce`` that sends fp32 CPU
    calls which are plain products (``plain_product``) through ``OneDNNLinear``."""

    def linear_with_grad_accumulation_and_async_allreduce(input, weight, bias, *args, **kwargs):
        if (
            input.device.type == "cpu"
            and input.dtype is torch.float32
            and weight.dtype is torch.float32
            and available()
            and plain_product(*args, **kwargs)
        ):
            return OneDNNLinear.apply(input, weight, bias)
        return original(input, weight, bias, *args, **kwargs)

    # the original reads and sets attributes on itself through its module global (``.warned``),
    # which is this function once installed: carry them over (and ``__wrapped__``)
    return functools.update_wrapper(linear_with_grad_accumulation_and_async_allreduce, original)
