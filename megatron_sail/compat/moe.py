"""Internals of megatron-core's MoE layer used on machines without Transformer Engine.

Written for megatron-core 0.16.1 (see ``WORKAROUNDS`` in ``__init__.py``),
``router_gemm_without_te``: ``moe_utils`` imports ``te_general_gemm`` only when Transformer
Engine imports, yet its router GEMM tests the name unconditionally (a NameError without TE);
the name set to None selects its torch path (``torch.mm`` / ``addmm`` in the router dtype).
"""

from __future__ import annotations


def ensure_router_gemm_fallback() -> None:
    """Define ``moe_utils.te_general_gemm`` as None when TE did not (idempotent; TE's real
    function is left alone)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
