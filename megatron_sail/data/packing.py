"""Packing samples into fixed-length rows: first-fit-decreasing within a shuffled block.

A block is ``packing_buffer`` consecutive input records. Its samples are shuffled with a
seed derived from (seed, block id), sorted by length (longest first, stable) and each placed in
the first row with room, so a sample is never split. Blocks are packed independently: memory
stays bounded, and a sharded run packs every block exactly as a single run would.
"""
from __future__ import annotations

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


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) from first-fit-decreasing; every length must fit.

    Items of equal length keep their input order (stable sort), so the result is deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    room = np.empty(len(lengths), dtype=np.int64)
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item of length {n} exceeds the row capacity {capacity}")
        fits = np.flatnonzero(room[:len(bins)] >= n)
        if fits.size:
            b = int(fits[0])
        else:
            b = len(bins)
            bins.append([])
            room[b] = capacity
        bins[b].append(i)
        room[b] -= n
    return bins


def pack_block(samples: list[Sample], seq_length: int, seed: int, block: int) -> list[list[Sample]]:
    """Rows of one block: shuffle (seeded by block), then first-fit-decreasing."""
    perm = block_rng(seed, block).permutation(len(samples))
    shuffled = [samples[i] for i in perm]
    bins = first_fit_decreasing([len(s) for s in shuffled], seq_length)
    return [[shuffled[i] for i in b] for b in bins]
