"""Tensor-parallel layers as plain torch calls while generating at TP=1.

Megatron's ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding route every call
through autograd Functions (the linear with async grad all-reduce, the copy / reduce mappings)
and process-group lookups, even with one tensor-parallel rank and no gradients: about twenty
``Function.apply`` calls per decode step of a two-layer model, each a Python round trip that
costs more than the matmul it wraps at small widths. Under ``torch.no_grad`` at TP=1 those layers
compute ``F.linear`` / ``F.embedding`` and nothing else, so ``plain_layers`` swaps in exactly that
for the duration of a generation (an instance attribute over the class's ``forward``; removed on
exit, so training, checkpoints and hooks never see it). Any layer whose own TP group has more
than one rank, or that scatters to sequence-parallel regions, keeps Megatron's forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


def _alone(module) -> bool:
    """The module's tensor-parallel group (if any) has a single rank."""
    group = getattr(module, "tp_group", None)
    return group is None or group.size() == 1


def _column_forward(m: ColumnParallelLinear, linear=F.linear):
    """ColumnParallelLinear.forward at TP=1 without autograd: (output, bias if skipped)."""

    def forward(input_, weight=None, runtime_gather_output=None):
        w = m.weight if weight is None else weight
        if m.skip_bias_add:
            return linear(input_, w), m.bias
        return linear(input_, w, m.bias), None

    return forward


def _row_forward(m: RowParallelLinear, linear=F.linear):
    """RowParallelLinear.forward at TP=1 without autograd: (output, bias if skipped)."""

    def forward(input_):
        if m.skip_bias_add:
            return linear(input_, m.weight), m.bias
        return linear(input_, m.weight, m.bias), None

    return forward


def _embedding_forward(m: VocabParallelEmbedding):
    """VocabParallelEmbedding.forward at TP=1: the lookup."""

    def forward(input_):
        return F.embedding(input_, m.weight)

    return forward


def _plain_forward(module, linear=F.linear):
    """The plain forward for a swappable module, else None; linear layers multiply with
    ``linear`` (F.linear's signature; a generator on CPU passes platform/onednn_linear's)."""
    if not _alone(module):
        return None
    kind = type(module)
    if kind is ColumnParallelLinear and not module.sequence_parallel:
        return _column_forward(module, linear)
    if kind is RowParallelLinear and not module.sequence_parallel:
        return _row_forward(module, linear)
    if kind is VocabParallelEmbedding and not module.reduce_scatter_embeddings:
        return _embedding_forward(module)
    return None


def swappable(chunks: list) -> list:
    """The TP=1 parallel layers of ``chunks`` that ``plain_layers`` can swap (a generator finds
    them once: walking every module per call cost a twentieth of a tiny model's prefill)."""
    return [m for chunk in chunks for m in chunk.modules() if _plain_forward(m) is not None]


@contextmanager
def plain_layers(modules: list, linear=F.linear):
    """Within the block (which must run under no_grad), the given TP=1 parallel layers (see
    ``swappable``) call ``linear`` (F.linear by default) / F.embedding directly. Restores the
    modules on exit."""
    swapped = []
    try:
        for module in modules:
            forward = _plain_forward(module, linear)
            if forward is not None and "forward" not in module.__dict__:
                module.forward = forward
                swapped.append(module)
        if swapped and torch.is_grad_enabled():
            raise RuntimeError("plain_layers is for generation under torch.no_grad()")
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
