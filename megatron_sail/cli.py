"""What every command-line entry point shares: a user's mistake ends in one ``error: ...`` line
and exit code 2, not a traceback (once per job under torchrun); the project's own notices go
through logging to stderr.

A user-facing error is one of ``USER_ERRORS``: the project raises ``ValueError`` (and its
subclasses: ``ResumeMismatch``, ``CheckpointDamaged``, ``SaveDirError``, ...) or an ``OSError``
about a path for anything the user can fix by changing a flag or a file; a full disk (an
``OSError`` with errno ENOSPC) is one too. Anything else is a bug
and keeps its traceback. ``SAIL_TRACEBACK=1`` shows the traceback of user errors too, for
debugging.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import time
from typing import Callable, NoReturn, Optional, Sequence

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FileExistsError,
)
"""Exceptions that mean "the input or a flag is wrong" (UnicodeDecodeError is a ValueError)."""

EXIT_USAGE = 2
"""Exit code of a user error, as argparse uses it."""

RANK_PEER_GRACE_S = 3.0
"""How long a non-zero rank waits before printing its own error: when rank 0 failed on the same
input, the launcher stops this rank first, so the job shows the message once."""

DEFERRED_GRACE_S = 30.0
"""How long a rank whose error only repeats another rank's (``cli_defer``: a checkpoint not saved
because a peer could not write) waits before printing it: the failing rank's exit can take
seconds (process groups, threads), and the launcher stops this rank once it sees that exit."""

log = logging.getLogger("megatron_sail")


def rank() -> int:
    """This process's global rank from the launcher's environment (0 when there is none)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class _NoticeFormatter(logging.Formatter):
    """Progress (INFO) as plain lines; warnings prefixed ``notice:`` so they stand out."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"notice: {text}" if record.levelno >= logging.WARNING else text


def setup_logging(level: int = logging.INFO) -> None:
    """Project notices (``log.warning("--bf16 ignored on CPU ...")``, prefixed ``notice:``) and
    progress (``log.info``) to stderr, one line each; warnings.warn is reserved for deprecations
    of our own API."""
    if any(getattr(h, "_sail", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_NoticeFormatter())
    handler._sail = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(level)


def error_line(e: BaseException) -> str:
    """The one line a user sees: the message, or the exception's name when it has none."""
    text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.strerror and e.filename:  # not "[Errno 2] ... 'path'"
        text = f"{e.strerror}: {e.filename}"
    return "error: " + text.replace("\n", "\n  ")  # details a message carries stay indented


def _die_on_sigterm() -> None:
    """While a rank waits to see whether another rank's error ends the job, the launcher's
    SIGTERM must end this process (the trainer's exit handler would only note it, and the
    rank would print a second line after the grace period)."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread: nothing was installed here
        pass


def fail(e: BaseException) -> NoReturn:
    """Print ``e`` as one line (from rank 0; from another rank only if the job is still alive
    after a short grace period) and exit 2. An error may say who reports it through a
    ``cli_defer`` attribute: True when another rank holds the real message (a rank that only
    learned that a checkpoint save failed elsewhere waits, even rank 0), False when this rank
    is the one that failed (it prints at once, whatever its rank)."""
    r = rank()
    defer = getattr(e, "cli_defer", None)
    if (r != 0) if defer is None else defer:
        _die_on_sigterm()
        time.sleep(DEFERRED_GRACE_S if defer else RANK_PEER_GRACE_S)
    print(error_line(e) if r == 0 else f"{error_line(e)} (rank {r})", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def run(
    main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None
) -> NoReturn:
    """Call an entry point's ``main(argv)`` and exit with its code; user errors become one line
    (see the module docstring), other exceptions keep their traceback."""
    setup_logging()
    try:
        code = main() if argv is None else main(argv)
    except USER_ERRORS as e:
        if os.environ.get("SAIL_TRACEBACK") == "1":
            raise
        fail(e)
    except OSError as e:  # a full disk: the user frees space, no traceback helps
        if e.errno != errno.ENOSPC or os.environ.get("SAIL_TRACEBACK") == "1":
            raise
        fail(e)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(code or 0))
