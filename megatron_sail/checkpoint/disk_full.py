"""A full disk while a checkpoint is written: one clear line instead of a chained traceback.

A save that runs out of space fails deep inside whatever was writing: DCP's file writer (its
error comes back wrapped per rank in a ``CheckpointException``, pickled across ranks, which
drops the ``OSError`` that the zip writer's error had as its context), torch's zip writer for
``torch.save`` (``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, without
an errno), ``shutil.copytree`` for the tokenizer. checkpoint/dcp.py turns its shard writes'
failures into the message on the rank that wrote, while the file is known; ``find_no_space``
digs the ENOSPC out of everything else (for torch's errno-less writer errors: by the free space
left), and ``explain`` says it once, as preprocessing does (data/integrity.py ``write_error``):
which file (or folder) was being written and how much space is left there.
"""

from __future__ import annotations

import errno
import os
from typing import Iterator, Optional

from megatron_sail.data.integrity import OutputWriteError, write_error


class CheckpointNotSaved(OSError):
    """Another rank could not write its part of a checkpoint (that rank's error says why); this
    rank stops too, so that nothing is published and no rank waits in the next collective."""

    cli_defer = True
    """cli.fail lets the rank that failed speak first (this rank prints only if the job is
    still alive after the grace period), so the user reads the full-disk line once."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message, without "[Errno 28]"


def reported_by(err: BaseException, failed_ranks: list[int], rank: int) -> BaseException:
    """Mark ``err`` (this rank's own failure) for cli.fail: the lowest failed rank prints at
    once, other failed ranks defer to it; returns ``err``."""
    try:
        err.cli_defer = bool(failed_ranks) and rank != min(failed_ranks)  # type: ignore[attr-defined]
    except AttributeError:  # an exception type with __slots__: the default rule applies
        pass
    return err


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, its causes and contexts, and the per-rank failures a DCP CheckpointException
    carries (``failures``: rank -> exception or wrapped traceback)."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]


def find_no_space(err: BaseException) -> Optional[OSError]:
    """The ENOSPC error inside ``err`` (itself, a cause, or a rank's failure), else None."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
    return None


TORCH_WRITER_FAILURES = ("inline_container.cc", "iostream error")
"""What torch's C++ file writer says when a write comes up short (``torch.save`` to a path, or
its zip writer on a file whose ``write`` failed once the errno is lost on the way): it carries
no errno, so a full disk is recognized by these words plus the free space left."""
FULL_BELOW_BYTES = 1 << 20
"""A file system with less free space than this right after a failed write counts as full."""


def free_bytes(path: str) -> Optional[int]:
    """Free bytes (for this user) on the file system of ``path`` or of its nearest existing
    parent folder; None when it cannot be told."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _errnoless_full_disk(err: BaseException, path: str) -> bool:
    """torch's writer failed without an errno and the disk under ``path`` is (nearly) full."""
    torch_failed = any(
        isinstance(e, RuntimeError) and any(w in str(e) for w in TORCH_WRITER_FAILURES) for e in _chain(err)
    )
    free = free_bytes(path) if torch_failed else None
    return free is not None and free < FULL_BELOW_BYTES


def explain(err: BaseException, path: str) -> Optional[OutputWriteError]:
    """ "no space left on device while writing PATH (N bytes free)" for a write of ``path`` that
    failed with ``err`` when a full disk is why (the failing file's own name when the error
    carries one, or the message a rank already made), else None."""
    if isinstance(err, OutputWriteError) and err.errno == errno.ENOSPC:
        return err
    found = find_no_space(err)
    if isinstance(found, OutputWriteError):  # made where the file was known (checkpoint/dcp.py)
        return found
    if found is None:
        if not _errnoless_full_disk(err, path):
            return None
        found = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write_error(
        str(found.filename) if found.filename else path,
        OSError(errno.ENOSPC, found.strerror or "No space left on device"),
    )
