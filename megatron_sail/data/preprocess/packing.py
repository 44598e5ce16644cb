"""Packing samples into fixed-length rows: first-fit-decreasing within a shuffled block.

A block is ``packing_buffer`` consecutive input records. Its samples are shuffled with a
seed derived from (seed, block id) and packed first-fit-decreasing (longest first, each into
the first row with room), with a small bounded search that refills the end of each row (see
``first_fit_decreasing``); a sample is never split. Blocks are packed independently: memory
stays bounded, and a sharded run packs every block exactly as a single run would.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class ImageEntry:
    """One image of a sample as it will be stored."""

    data: Optional[bytes]
    """Encoded bytes (JPEG/PNG as given, other formats re-encoded to PNG); None while only
    ``origin`` travels back from a worker."""
    grid: tuple[int, int]
    """(cols, rows) tile grid."""
    thumbnail: bool
    """Thumbnail tile appended (only when cols*rows > 1)."""
    size: tuple[int, int]
    """Original (width, height)."""
    origin: Optional[tuple[str, str]] = None
    """Where unchanged bytes can be read again (formats.ImageBlob); None for re-encoded ones."""


@dataclass
class Sample:
    """One tokenized sample, ready to pack."""

    tokens: np.ndarray
    """int32 token ids."""
    loss_mask: np.ndarray
    """uint8 shifted loss mask (loss_mask[t] = 1 iff token t+1 is trained)."""
    images: list[ImageEntry] = field(default_factory=list)
    """Images in <IMG_CONTEXT> order."""
    record: int = -1
    """Position of the source record within its block (to re-read detached image bytes)."""

    def __len__(self) -> int:
        return len(self.tokens)


def block_rng(seed: int, block: int) -> np.random.Generator:
    """The shuffle generator of one block: depends only on (seed, block), not on the shard."""
    return np.random.default_rng([seed, block])


class _Pool:
    """Unplaced items grouped by length, longest length first, for first-fit lookups."""

    def __init__(self, lengths: list[int]):
        self.by_len: dict[int, deque] = {}
        for i, n in enumerate(lengths):
            self.by_len.setdefault(n, deque()).append(i)
        self.desc = sorted(self.by_len, reverse=True)
        self._neg = [-n for n in self.desc]  # ascending, for bisect

    def __bool__(self) -> bool:
        return bool(self.by_len)

    def count(self, n: int) -> int:
        return len(self.by_len.get(n, ()))

    def first_fitting(self, room: int, start: int = 0) -> int:
        """Position in ``desc`` of the longest length <= room (len(desc) if none)."""
        return max(start, bisect.bisect_left(self._neg, -room))

    def take(self, n: int) -> int:
        q = self.by_len[n]
        i = q.popleft()
        if not q:
            del self.by_len[n]
            k = bisect.bisect_left(self._neg, -n)
            del self._neg[k], self.desc[k]
        return i

    def put_back(self, n: int, i: int) -> None:
        if n not in self.by_len:
            self.by_len[n] = deque()
            k = bisect.bisect_left(self._neg, -n)
            self._neg.insert(k, -n)
            self.desc.insert(k, n)
        self.by_len[n].appendleft(i)


def first_fit_decreasing(
    lengths: list[int], capacity: int, tail: int = 3, budget: int = 400
) -> list[list[int]]:
    """Bins (lists of item indices): first-fit-decreasing, with a bounded search at each row's end.

    Rows are filled one at a time with the longest item that still fits, which is exactly
    first-fit-decreasing. When a row is left with room, its last ``tail`` items are put back
    and a small search (depth tail + 2, at most ``budget`` steps) picks the unplaced items that
    fill the freed space best; its first candidate is the greedy choice, so a row never gets
    worse. This matters when many lengths are similar (e.g. 31-57 tokens in 256-token rows),
    where plain FFD leaves a gap in most rows. Items of equal length are taken in input order,
    so the result is deterministic. Every length must fit the capacity.
    """
    for n in lengths:
        if n > capacity:
            raise ValueError(f"item of length {n} exceeds the row capacity {capacity}")
    pool = _Pool(lengths)
    bins: list[list[int]] = []
    while pool:
        row, room = [], capacity
        j = pool.first_fitting(room)
        while j < len(pool.desc):
            n = pool.desc[j]
            row.append(pool.take(n))
            room -= n
            j = pool.first_fitting(room)
        if tail > 0 and room and pool and len(row) > 1:
            room = _refill_tail(row, room, min(tail, len(row) - 1), lengths, pool, budget)
        bins.append(row)
    return bins


def _refill_tail(row: list[int], room: int, k: int, lengths: list[int], pool: _Pool, budget: int) -> int:
    """Put the row's last k items back and refill the space with the best subset found.

    Depth-first over lengths, longest first (the first path is the greedy refill, i.e. the
    items just put back); stops at an exact fit or after ``budget`` steps. Returns the new room.
    """
    freed = row[-k:]
    del row[-k:]
    target = room + sum(lengths[i] for i in freed)
    for i in reversed(freed):
        pool.put_back(lengths[i], i)
    best_room, best = target, []
    chosen: list[int] = []
    used: dict[int, int] = {}
    steps = 0

    def search(start: int, left: int, depth: int) -> bool:
        """True when the search should stop (exact fit, or the budget is spent)."""
        nonlocal best_room, best, steps
        if left < best_room:
            best_room, best = left, list(chosen)
        if left == 0:
            return True
        if depth == 0:
            return False
        j = pool.first_fitting(left, start)
        while j < len(pool.desc):
            steps += 1
            if steps > budget:
                return True
            n = pool.desc[j]
            if used.get(n, 0) < pool.count(n):
                used[n] = used.get(n, 0) + 1
                chosen.append(n)
                if search(j, left - n, depth - 1):
                    return True
                chosen.pop()
                used[n] -= 1
            j += 1
        return False

    search(0, target, k + 2)
    row.extend(pool.take(n) for n in best)
    return best_room


def pack_block(samples: list[Sample], seq_length: int, seed: int, block: int) -> list[list[Sample]]:
    """Rows of one block: shuffle (seeded by block), then first-fit-decreasing."""
    perm = block_rng(seed, block).permutation(len(samples))
    shuffled = [samples[i] for i in perm]
    bins = first_fit_decreasing([len(s) for s in shuffled], seq_length)
    return [[shuffled[i] for i in b] for b in bins]
