"""fp32 linear layers on CPU through oneDNN's matmul instead of MKL's sgemm, for generation.

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
they do not. Only for inference: the op has no backward here, so training keeps ``F.linear``.
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
