"""Progress of a long step: a bar with rate and ETA on a terminal, a periodic one-line report
off a terminal (nohup, CI, a log file), so that hours of work are never silent and a log never
holds a 200 KB carriage-return line.

    with Progress(total=len(items), desc="preprocess", unit="records") as bar:
        for item in items:
            ...
            bar.update(1)
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, TextIO

DEFAULT_INTERVAL_S = 30.0
"""Seconds between report lines off a terminal (``SAIL_PROGRESS_INTERVAL`` overrides)."""


@dataclass
class ProgressConfig:
    """How progress is shown."""

    interval_s: float = DEFAULT_INTERVAL_S
    """Seconds between lines when the stream is not a terminal."""
    enabled: bool = True
    """False: nothing is printed (library use, tests)."""


def _eta(seconds: float) -> str:
    """'1h02m', '4m05s' or '12s'."""
    s = int(max(seconds, 0))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Counts done units against an optional total and reports them (see module docstring)."""

    def __init__(
        self,
        total: Optional[int] = None,
        desc: str = "",
        unit: str = "it",
        stream: Optional[TextIO] = None,
        config: Optional[ProgressConfig] = None,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        cfg = config or ProgressConfig(
            interval_s=float(os.environ.get("SAIL_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
        )
        self.cfg, self.done = cfg, 0
        self.t0 = self._last = time.monotonic()
        self._bar = None
        if cfg.enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream, dynamic_ncols=True)

    def line(self) -> str:
        """'desc: 120/1000 records (35.2 records/s, ETA 25s)'."""
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / elapsed
        of = f"/{self.total}" if self.total is not None else ""
        eta = ""
        if self.total is not None and rate > 0:
            eta = f", ETA {_eta((self.total - self.done) / rate)}"
        return f"{self.desc}: {self.done}{of} {self.unit} ({rate:.1f} {self.unit}/s{eta})"

    def update(self, n: int = 1) -> None:
        """Add ``n`` done units; print a line when the interval has passed (off a terminal)."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.cfg.enabled and time.monotonic() - self._last >= self.cfg.interval_s:
            self._last = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        """Final report (off a terminal: one closing line with the totals)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.cfg.enabled and self.done:
            print(self.line().replace(", ETA 0s", "") + " done", file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
