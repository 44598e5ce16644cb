"""DecodeState: the per-row bookkeeping of one decode batch, kept on the model's device.

Every decode step appends one token per row, and a row ends on a stop token (once
``min_new_tokens`` exist) or when its budget is used up. Keeping that state in device tensors
(tokens written by column, a running mask, a count per row) instead of Python lists means a
step never reads a value back to the host: the loop only asks ``running()`` (one sync) every
few steps, and a GPU step has fixed shapes throughout (CUDA-graph friendly). Rows that ended
keep being fed (their writes land past their count and are ignored), so the batch shape never
changes.

All rows that still run have produced exactly ``step`` tokens at step ``step`` (one per step
since the prefill), which is why one column per step holds every row's token.
"""

from __future__ import annotations

import torch


class DecodeState:
    """Tokens, counts and the running mask of ``rows`` rows (the first ``len(budgets)`` are
    prompts; the rest pad the batch to a multiple of TP and never run)."""

    def __init__(
        self,
        prompt_lens: list[int],
        budgets: list[int],
        rows: int,
        stop_ids: tuple[int, ...],
        min_new_tokens: int,
        device: torch.device,
    ):
        pad = rows - len(budgets)
        self.n = len(budgets)
        self.width = max(budgets, default=0)
        """Most tokens any row may produce (= decode steps at most, the prefill's included)."""
        self.min_new = min_new_tokens
        self.out = torch.zeros(rows, max(self.width, 1), dtype=torch.long, device=device)
        self.budget = torch.tensor(list(budgets) + [0] * pad, dtype=torch.long, device=device)
        self.count = torch.zeros(rows, dtype=torch.long, device=device)
        self.live = self.budget > 0
        self.last_pos = torch.tensor([max(n, 1) - 1 for n in prompt_lens] + [0] * pad, device=device)
        """Position of each prompt's last token; a row's next input sits at ``last_pos + count``."""
        self.stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
        self.tokens = self.out[:, 0]
        self._rows = None
        """The tokens of the last step: every row's next input."""

    def accept(self, tokens: torch.Tensor, step: int) -> None:
        """Record step ``step``'s tokens [rows] (device ops only): running rows take their
        token, or end on a stop token; rows whose count reaches the budget end too."""
        self.out[:, step] = tokens
        self.tokens = tokens
        if step >= self.min_new and self.stops.numel():
            self.live.masked_fill_(torch.isin(tokens, self.stops), False)
        self.count += self.live
        self.live.logical_and_(self.count < self.budget)

    def positions(self) -> torch.Tensor:
        """Cache position of each row's next input token (the token it accepted last); rows
        that ended get a valid position of their own row, whose result nobody reads."""
        return self.last_pos + self.count

    def running(self) -> bool:
        """Whether any row still runs (reads one value back from the device)."""
        return bool(self.live.any())

    def rows(self) -> list[tuple[list[int], str, int | None]]:
        """Per prompt: its tokens, 'stop' or 'length', and the stop token it ended on (or None);
        read back from the device once."""
        if self._rows is not None:
            return self._rows
        out, count, budget = self.out.tolist(), self.count.tolist(), self.budget.tolist()
        result = []
        for i in range(self.n):
            c = count[i]
            if c >= budget[i]:
                result.append((out[i][:c], "length", None))
            else:  # ended early: column c holds the stop token it chose
                result.append((out[i][:c], "stop", out[i][c]))
        self._rows = result
        return result
