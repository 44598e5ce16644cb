"""Packing samples into fixed-length rows: first-fit-decreasing within a shuffled block.

A block is ``packing_buffer`` consecutive input records. Its samples are shuffled with a
seed derived from (seed, block id) and packed first-fit-decreasing (longest first, each into
the first row with room; plus a pair-swap refinement, see ``first_fit_decreasing``), so a
sample is never split. Blocks are packed independently: memory
stays bounded, and a sharded run packs every block exactly as a single run would.
"""
from __future__ import annotations

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
    """Unplaced items by length: the largest that fits, and the best pair under a bound."""

    def __init__(self, lengths: list[int]):
        self.by_len: dict[int, deque] = {}
        for i, n in enumerate(lengths):
            self.by_len.setdefault(n, deque()).append(i)
        self.sizes = np.array(sorted(self.by_len), dtype=np.int64)

    def __bool__(self) -> bool:
        return bool(self.by_len)

    def take(self, n: int) -> int:
        q = self.by_len[n]
        i = q.popleft()
        if not q:
            del self.by_len[n]
            self.sizes = self.sizes[self.sizes != n]
        return i

    def put_back(self, n: int, i: int) -> None:
        if n not in self.by_len:
            self.by_len[n] = deque()
            self.sizes = np.sort(np.append(self.sizes, n))
        self.by_len[n].appendleft(i)

    def largest_fitting(self, room: int) -> int:
        """Largest unplaced length <= room, or 0."""
        k = int(np.searchsorted(self.sizes, room, side="right")) - 1
        return int(self.sizes[k]) if k >= 0 else 0

    def best_pair(self, low: int, high: int) -> tuple[int, int]:
        """Two unplaced lengths (a, b) with low < a + b <= high and the largest sum, or (0, 0)."""
        s = self.sizes
        if s.size == 0:
            return 0, 0
        k = np.searchsorted(s, high - s, side="right") - 1
        ok = k >= 0
        sums = np.where(ok, s + s[np.maximum(k, 0)], -1)
        for j in np.argsort(-sums, kind="stable"):
            total = int(sums[j])
            if total <= low:
                break
            a, b = int(s[j]), int(s[k[j]])
            if a != b or len(self.by_len[a]) >= 2:
                return a, b
            if k[j] > 0 and a + int(s[k[j] - 1]) > low:  # same length but only one item: next smaller
                return a, int(s[k[j] - 1])
        return 0, 0


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices), first-fit-decreasing with a pair-swap refinement.

    Rows are filled one at a time with the largest item that still fits, which is exactly
    first-fit-decreasing. Before a row is closed, one of its items may be swapped for two
    unplaced items that fill the row better (then it is topped up again): with many similar
    lengths (e.g. 31-57 tokens in 256-token rows) plain FFD leaves a gap in most rows that no
    remaining item fits. Items of equal length are taken in input order, so the result is
    deterministic. Every length must fit the capacity.
    """
    for n in lengths:
        if n > capacity:
            raise ValueError(f"item of length {n} exceeds the row capacity {capacity}")
    pool = _Pool(lengths)
    bins: list[list[int]] = []
    while pool:
        items: list[int] = []
        room = capacity
        while True:
            n = pool.largest_fitting(room)
            while n:
                items.append(pool.take(n))
                room -= n
                n = pool.largest_fitting(room)
            if not room or not pool or not _swap_in_pair(items, room, lengths, pool):
                break
            room = capacity - sum(lengths[i] for i in items)
        bins.append(items)
    return bins


def _swap_in_pair(items: list[int], room: int, lengths: list[int], pool: _Pool) -> bool:
    """Replace one item of the row by two unplaced ones with a larger total; True if done."""
    best = None
    for x in sorted({lengths[i] for i in items}):
        a, b = pool.best_pair(x, x + room)
        if a and (best is None or a + b - x > best[0]):
            best = (a + b - x, x, a, b)
    if best is None:
        return False
    _, x, a, b = best
    out = next(i for i in reversed(items) if lengths[i] == x)
    items.remove(out)
    items.append(pool.take(a))
    items.append(pool.take(b))
    pool.put_back(x, out)
    return True


def pack_block(samples: list[Sample], seq_length: int, seed: int, block: int) -> list[list[Sample]]:
    """Rows of one block: shuffle (seeded by block), then first-fit-decreasing."""
    perm = block_rng(seed, block).permutation(len(samples))
    shuffled = [samples[i] for i in perm]
    bins = first_fit_decreasing([len(s) for s in shuffled], seq_length)
    return [[shuffled[i] for i in b] for b in bins]
