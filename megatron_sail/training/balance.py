"""Rows of a global batch split over data-parallel ranks so their modelled step FLOPs are even.

Packed rows all hold ``seq_length`` tokens, but the vision encoder's share of a row's work
ranges from nothing (text-only rows) to most of it (rows of 13-tile photos). Every rank waits
for the slowest one at the gradient reduction, so a contiguous split of the global batch runs
at the pace of its most image-heavy slice. ``assign`` instead hands out the rows by cost:
largest first to the least-loaded rank that still has room (every rank gets the same number of
rows), then moves the largest remaining gap by swapping one row of the busiest rank with one
of another rank while that lowers the busiest rank's load.

The result depends only on the costs, which are a function of the rows, which are a function
of the step index: resume at any layout keeps the data order exact. The global batch's rows
and the per-token loss normalization (training/step.py) are unchanged, so the loss of a step
equals the unbalanced one up to the order of the summation.
"""

from __future__ import annotations

from typing import Sequence

MAX_SWAPS_PER_ROW = 4
"""Bound on the swap passes: at most this many times the rows of the global batch."""


def assign(costs: Sequence[float], dp: int, per_rank: int) -> list[list[int]]:
    """Positions ``0..len(costs)-1`` split into ``dp`` lists of ``per_rank`` each, in ascending
    order, with the summed costs of the lists close to equal. Deterministic: ties go to the
    lower position and the lower rank."""
    n = len(costs)
    if n != dp * per_rank:
        raise ValueError(f"{n} rows cannot split into {dp} ranks x {per_rank} rows")
    ranks: list[list[int]] = [[] for _ in range(dp)]
    loads = [0.0] * dp
    for i in sorted(range(n), key=lambda i: (-costs[i], i)):
        r = min((r for r in range(dp) if len(ranks[r]) < per_rank), key=lambda r: (loads[r], r))
        ranks[r].append(i)
        loads[r] += costs[i]
    for _ in range(MAX_SWAPS_PER_ROW * n):
        if not _swap_once(costs, ranks, loads):
            break
    return [sorted(r) for r in ranks]


def _swap_once(costs: Sequence[float], ranks: list[list[int]], loads: list[float]) -> bool:
    """Swap the one pair (row of the busiest rank, row of another rank) that lowers the busiest
    rank's load the most without lifting the other above it; False when none does."""
    top = max(range(len(loads)), key=lambda r: (loads[r], -r))
    best = None  # (new max of the two ranks, other rank, index in top, index in other)
    for other in range(len(loads)):
        gap = loads[top] - loads[other]
        if other == top or gap <= 0:
            continue
        for a, x in enumerate(ranks[top]):
            for b, y in enumerate(ranks[other]):
                d = costs[x] - costs[y]
                if 0 < d < gap:
                    worse = max(loads[top] - d, loads[other] + d)
                    if best is None or worse < best[0]:
                        best = (worse, other, a, b)
    if best is None:
        return False
    _, other, a, b = best
    x, y = ranks[top][a], ranks[other][b]
    ranks[top][a], ranks[other][b] = y, x
    d = costs[x] - costs[y]
    loads[top] -= d
    loads[other] += d
    return True


def straggler(costs: Sequence[float], ranks: Sequence[Sequence[int]]) -> float:
    """Max over mean of the ranks' summed costs: the step time relative to a perfect split."""
    loads = [sum(costs[i] for i in r) for r in ranks]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def contiguous(n: int, dp: int) -> list[list[int]]:
    """The unbalanced split: rank r takes the r-th contiguous slice."""
    per = n // dp
    return [list(range(r * per, (r + 1) * per)) for r in range(dp)]
