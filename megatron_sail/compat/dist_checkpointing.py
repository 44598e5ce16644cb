"""Internals of megatron-core's dist_checkpointing and torch DCP that the checkpoint writer uses.

Written for megatron-core 0.16.1 and torch 2.13 (see ``WORKAROUNDS`` in ``__init__.py``):

- ``sharded_key_groups``: Megatron's own ``torch_dist`` save first groups the flattened
  ShardedTensors by their global key (dropping non-main replicas) with a private helper; the
  synchronous and threaded writers do the same, so their files are ``torch_dist`` files.
- ``CallerQueue``: ``AsyncCallsQueue`` creates the caller that runs each scheduled save in its
  private ``_get_async_caller`` (0.16.1: a forked process or a persistent worker); the
  subclass lets the checkpoint code choose the caller class instead.
- ``wrapped_exception``: DCP hands a failed write to the finalizing step as its private
  "wrapped exception" result, which the coordinator re-raises on every rank.
"""

from __future__ import annotations

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCaller, AsyncCallsQueue


def sharded_key_groups(sharded_state_dict, keep_only_main_replica: bool) -> dict:
    """{global key: [ShardedBase, ...]}: the flattened state dict grouped by sharded key, only
    main replicas when ``keep_only_main_replica`` (what DCP's planner receives)."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys,
    )

    groups, _flat_mapping, _rename_mapping = _replace_state_dict_keys_with_sharded_keys(
        sharded_state_dict, keep_only_main_replica
    )
    return groups


class CallerQueue(AsyncCallsQueue):
    """Megatron's queue of pending asynchronous saves, whose calls run on ``caller_type``
    (an ``AsyncCaller`` subclass) instead of the forked process Megatron picks."""

    caller_type: type[AsyncCaller]
    """The caller class; subclasses set it."""

    def _get_async_caller(self) -> AsyncCaller:
        """One new caller per scheduled request (as 0.16.1's non-persistent path)."""
        return self.caller_type()


def wrapped_exception(error: BaseException):
    """A write result that carries ``error`` to DCP's finalization (re-raised there)."""
    from torch.distributed.checkpoint.utils import _wrap_exception

    return _wrap_exception(error)
