"""Graceful exit: SIGTERM / SIGINT and --exit-duration-in-mins both mean "save, then exit 0".

A signal handler only sets a flag; the loop checks ``should_exit()`` between steps, where the
model and optimizer are consistent, and all ranks agree through one all-reduce so that every rank
saves the same step (a rank that saw the signal alone would otherwise deadlock the save).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_sail.platform.distributed import device


@dataclass
class ExitWatcher:
    """Tracks exit requests from signals and the wall-clock budget."""

    duration_mins: Optional[float] = None
    """Exit once this much time has passed since start (None: no limit)."""
    start: float = field(default_factory=time.monotonic)
    """monotonic() at the start of training."""
    received: Optional[int] = None
    """The signal number received, if any."""

    def install(self) -> "ExitWatcher":
        """Route SIGTERM and SIGINT to the flag (main thread only, as Python requires)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        """Remember the signal; the loop acts on it at the next step boundary."""
        self.received = signum

    def local_reason(self) -> Optional[str]:
        """Why this rank wants to stop, or None."""
        if self.received is not None:
            return f"received {signal.Signals(self.received).name}"
        if self.duration_mins is not None and time.monotonic() - self.start >= self.duration_mins * 60.0:
            return f"exit duration of {self.duration_mins} min reached"
        return None

    def should_exit(self) -> Optional[str]:
        """Agree across all ranks: stop if any rank wants to; returns the reason or None."""
        reason = self.local_reason()
        if not torch.distributed.is_initialized():
            return reason
        # On the model's device: under NCCL (GPU) a CPU tensor cannot be all-reduced.
        flag = torch.tensor([1 if reason else 0], dtype=torch.int32, device=device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() == 0:
            return None
        return reason or "another rank asked to exit"
