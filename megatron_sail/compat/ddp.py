"""Internals of megatron-core's DistributedDataParallel that generation relies on.

Written for megatron-core 0.16.1 (see ``WORKAROUNDS`` in ``__init__.py``), ``param_gather_hooks``:
with the distributed optimizer and overlapped param gather, DDP sets ``use_forward_hook`` and
keeps the forward pre-hooks that finish each bucket's all-gather in
``remove_forward_pre_hook_handles`` (empty while disabled). Right after an optimizer step each
data-parallel replica is current only for its own shard until the next training forward, so
generation finishes the gather and takes the hooks off first, as Megatron-LM does around
evaluation, and puts them back afterwards.
"""

from __future__ import annotations


def pause_param_gather_hooks(chunks: list) -> list:
    """Finish the param all-gather now and remove the forward pre-hooks of every DDP chunk
    that has them armed; returns the chunks to hand to ``resume_param_gather_hooks``."""
    paused = []
    for c in chunks:
        armed = getattr(c, "remove_forward_pre_hook_handles", None)
        if getattr(c, "use_forward_hook", False) and armed:
            c.disable_forward_pre_hook(param_sync=True)
            paused.append(c)
    return paused


def resume_param_gather_hooks(paused: list) -> None:
    """Re-arm the forward pre-hooks of the chunks ``pause_param_gather_hooks`` returned."""
    for c in paused:
        c.enable_forward_pre_hook()
