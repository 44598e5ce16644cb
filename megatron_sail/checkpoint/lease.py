"""Readers' leases: a checkpoint that generate or mcore-to-hf is reading is not pruned under them.

A run saving with ``--keep-last`` deletes older checkpoints as soon as a newer one is published;
a reader that had just resolved `latest` then loses its files half-way. So a reader holds a
lease while it reads: an empty file ``ROOT/.readers/iter_XXXXXXX.HOST.PID.N`` beside the
checkpoint (never inside it, where the manifest would call it unlisted), its modification time
refreshed by a thread every ``LEASE_BEAT_S``. The pruner (training/checkpoint.py) skips a
checkpoint with a fresh lease and deletes it at a later save, once the lease is gone.

A lease older than ``LEASE_TTL_S`` belongs to a reader that died without removing it (kill -9):
it protects nothing and the pruner removes it. A reader that cannot write the lease (a
read-only --save folder) reads without one; checkpoint/layout.py's ``read_checkpoint`` still
follows `latest` when its checkpoint is pruned meanwhile.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

LEASE_DIR = ".readers"
"""Folder of the leases, in the --save root."""
LEASE_TTL_S = 600.0
"""A lease not refreshed for this long is stale: its reader is gone."""
LEASE_BEAT_S = 60.0
"""How often a reader refreshes its lease."""
_count = itertools.count()
log = logging.getLogger(__name__)


def _lease_path(ckpt: str) -> str:
    """A new lease file name for ``ckpt``: unique per host, process and read."""
    root, name = os.path.split(os.path.abspath(ckpt))
    return os.path.join(root, LEASE_DIR, f"{name}.{socket.gethostname()}.{os.getpid()}.{next(_count)}")


def _create(path: str) -> None:
    """Create the lease file (and its folder)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "x"):
        pass


def _beat(path: str, stop: threading.Event) -> None:
    """Refresh the lease until ``stop`` is set (a daemon thread: it dies with the reader)."""
    while not stop.wait(LEASE_BEAT_S):
        try:
            os.utime(path)
        except OSError:  # removed by a pruner that judged it stale, or the folder went away
            return


@contextmanager
def reading(ckpt: str) -> Iterator[Optional[str]]:
    """Hold a lease on checkpoint folder ``ckpt`` while the block reads it; yields the lease
    file, or None when it could not be written (then the read is unprotected)."""
    path = _lease_path(ckpt)
    try:
        _create(path)
    except OSError as e:
        log.info(f"{ckpt}: no reader's lease ({e}); reading unprotected against pruning")
        yield None
        return
    stop = threading.Event()
    thread = threading.Thread(target=_beat, args=(path, stop), daemon=True, name="checkpoint-lease")
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()
        try:
            os.remove(path)
        except OSError:
            pass


def leased(root: str, now: Optional[float] = None) -> set[str]:
    """Names of the checkpoint folders under ``root`` that a live reader holds a lease on;
    stale leases (not refreshed for LEASE_TTL_S) are removed on the way."""
    folder = os.path.join(root, LEASE_DIR)
    try:
        names = os.listdir(folder)
    except OSError:
        return set()
    now = time.time() if now is None else now
    held = set()
    for name in names:
        path = os.path.join(folder, name)
        try:
            fresh = now - os.path.getmtime(path) < LEASE_TTL_S
        except OSError:  # released meanwhile
            continue
        if fresh:
            held.add(name.split(".", 1)[0])
        else:
            try:
                os.remove(path)
            except OSError:
                pass
    return held
