"""Worker processes that die with their parent, and never publish output after it is gone.

A pool worker (preprocessing's block workers, recaption's and filter_data's shard workers)
whose parent is killed with SIGKILL is re-parented to init and, blocked on a pipe, would live
on holding its memory; a shard worker in the middle of a shard would even finish and commit it
after the run is gone. ``watch_parent`` (called first in every worker initializer) asks Linux to
SIGKILL the worker when its parent dies (``prctl(PR_SET_PDEATHSIG)`` through ctypes), and also
starts a watchdog thread that polls the parent's pid, for other systems and for the cases the
signal misses (it is tied to the parent *thread* that forked the worker). Before a worker
renames finished output into place it calls ``check_parent``: a parent that is gone means the
output is dropped, not committed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Optional

PR_SET_PDEATHSIG = 1
"""prctl option number (linux/prctl.h)."""
POLL_S = 0.5
"""Watchdog period: how long an orphaned worker may outlive its parent at most, roughly."""

_PARENT: Optional[int] = None


class ParentGone(RuntimeError):
    """The process that started this worker is gone: its output must not be published."""


def _set_pdeathsig() -> bool:
    """Linux: SIGKILL this process when its parent dies. False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watchdog(parent: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent:
            os._exit(1)  # no cleanup handlers: they could block on the dead parent's pipes


def watch_parent(parent: int, poll_s: float = POLL_S) -> None:
    """Make this worker exit when ``parent`` (the pid recorded by the parent before it started
    the worker) dies. Exits at once when the parent is already gone."""
    global _PARENT
    _PARENT = parent
    _set_pdeathsig()
    if os.getppid() != parent:  # died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watchdog, args=(parent, poll_s), name="parent-watchdog", daemon=True).start()


def parent_alive() -> bool:
    """True in a process that is not a watched worker, or while the recorded parent lives."""
    return _PARENT is None or os.getppid() == _PARENT


def check_parent(what: str) -> None:
    """Raise ParentGone (so the caller drops ``what`` instead of committing it) when orphaned."""
    if not parent_alive():
        raise ParentGone(f"the parent process {_PARENT} is gone: {what} is not committed")


def guarded_initializer(parent: int, initializer, initargs: tuple) -> None:
    """A pool initializer that arms ``watch_parent`` before running the real one."""
    watch_parent(parent)
    if initializer is not None:
        initializer(*initargs)
