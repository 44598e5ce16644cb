"""The --save folder at start-up: usable, owned by this run alone, and not another run's.

Checked once, before the model is built, so a bad --save fails in seconds instead of at the
first save:

* --save naming a file (or a folder that cannot be created) is an error.
* A lock: rank 0 holds ``flock`` on ``<save>/.lock`` for the whole run (the kernel drops it
  when the process dies, so a kill -9 leaves no stale lock). A second run on the same --save is
  refused with the first one's host and pid. File systems without flock get a warning.
* A --save that already holds checkpoints (``latest`` or ``iter_XXXXXXX``) must be the run
  being resumed: --load names that folder or one of its checkpoints. Otherwise the start is
  refused (the new run's saves would prune the old run's checkpoints and move its `latest`)
  unless ``--overwrite-save``: then this run's checkpoints go beside the old ones, a save at an
  iteration that exists replaces it, and --keep-last prunes by save order (old ones first).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Optional

import torch.distributed as dist

from megatron_sail.checkpoint.layout import LATEST, LOCK_FILE, iter_dir, list_checkpoints


class SaveDirError(ValueError):
    """--save cannot be used by this run."""


class SaveDirLock:
    """An exclusive flock on ``<save>/.lock``, held until ``release`` or process exit."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns None, or why it could not be taken (held by whom)."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = os.pread(fd, 512, 0).decode("utf-8", errors="replace").strip()
                os.close(fd)
                return holder or "another process"
            os.close(fd)
            print(
                f"[checkpoint] WARNING: cannot lock {self.path} ({e}); two runs on this "
                "--save would not be detected",
                flush=True,
            )
            return None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"host {socket.gethostname()} pid {os.getpid()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
            0,
        )
        self._fd = fd
        return None

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _has_checkpoints(folder: str) -> list[str]:
    """The checkpoint entries of a folder (``latest``, ``iter_XXXXXXX``), sorted."""
    found = [os.path.basename(iter_dir(folder, i)) for i in list_checkpoints(folder)]
    if os.path.lexists(os.path.join(folder, LATEST)):
        found.append(LATEST)
    return found


def _resumes_from(save: str, load: Optional[str]) -> bool:
    """Whether --load names the --save folder itself or a checkpoint directly inside it."""
    if not load:
        return False
    s, loaded = os.path.realpath(save), os.path.realpath(load)
    return loaded == s or os.path.dirname(loaded) == s


def check_save_dir(save: str, load: Optional[str], overwrite: bool) -> Optional[str]:
    """Why --save cannot be used (None when it can); creates the folder. Rank-0 work."""
    if os.path.exists(save) and not os.path.isdir(save):
        return f"--save {save}: is a file, not a folder"
    try:
        os.makedirs(save, exist_ok=True)
    except OSError as e:
        return f"--save {save}: cannot create the folder ({e.strerror})"
    found = _has_checkpoints(save)
    if found and not overwrite and not _resumes_from(save, load):
        shown = ", ".join(found[:4] + (["..."] if len(found) > 4 else []))
        return (
            f"--save {save} already holds another run's checkpoints ({shown}) and this run "
            f"does not resume from it (--load {load or 'not given'}): its saves would "
            f"replace that run's `latest` and prune its checkpoints. Resume it with --load "
            f"{save}, pick an empty --save, or pass --overwrite-save to write beside them."
        )
    return None


def prepare_save_dir(save: Optional[str], load: Optional[str], overwrite: bool) -> Optional[SaveDirLock]:
    """Collective: check --save and take its lock on rank 0; every rank raises the same
    SaveDirError when it cannot be used. Returns the lock (rank 0) to keep for the run."""
    if not save:
        return None
    rank = dist.get_rank() if dist.is_initialized() else 0
    lock, problem = None, None
    if rank == 0:
        problem = check_save_dir(save, load, overwrite)
        if problem is None:
            lock = SaveDirLock(save)
            holder = lock.acquire()
            if holder is not None:
                lock = None
                problem = (
                    f"--save {save} is in use by another run ({holder}; lock "
                    f"{os.path.join(save, LOCK_FILE)}): two runs writing one --save "
                    "folder delete each other's checkpoints. Wait for it to end or "
                    "pick another --save."
                )
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem is not None:
        raise SaveDirError(problem)
    return lock
