"""Exact duplicates (content hash of the image bytes) and near-duplicates (perceptual hash
within a Hamming distance, found through a banding index over the hash bits)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

from megatron_sail.curate.filters.base import FilterSample, FilterStage, Reject


@dataclass
class ExactDedupConfig:
    """Byte-identical images: the first in input order is kept."""

    enabled: bool = True
    """Run this stage."""


class ExactDedup(FilterStage):
    """SHA-256 of the encoded image; a repeat names the sample it duplicates."""

    name = "exact_dedup"

    def __init__(self, cfg: ExactDedupConfig):
        self.cfg = cfg
        self.seen: dict[bytes, str] = {}

    def process(self, sample: FilterSample) -> Optional[Reject]:
        digest = hashlib.sha256(sample.image_bytes or b"").digest()
        first = self.seen.setdefault(digest, sample.where)
        if first != sample.where:
            return Reject("exact_duplicate", f"same bytes as {first}")
        return None


class BandIndex:
    """Hamming-radius search over fixed-width integer hashes by banding (LSH over hash bits).

    The bits are cut into ``max_distance + 1`` bands; two hashes within ``max_distance`` differ
    in at most that many bands, so they agree exactly on at least one (pigeonhole). Candidates
    come from the buckets of equal bands and are then checked by their real distance, so the
    search is exact, and each lookup touches only hashes sharing a band instead of all of them.
    """

    def __init__(self, bits: int, max_distance: int):
        self.max_distance = max_distance
        bands = max_distance + 1
        if bands > bits:
            raise ValueError(f"max_distance {max_distance} must be < the hash's {bits} bits")
        edges = [round(i * bits / bands) for i in range(bands + 1)]
        self.masks = [(((1 << (hi - lo)) - 1) << lo, lo) for lo, hi in zip(edges, edges[1:])]
        self.buckets: list[dict[int, list[int]]] = [{} for _ in self.masks]
        self.hashes: list[int] = []
        self.names: list[str] = []

    def query(self, h: int) -> Optional[tuple[int, int]]:
        """(index, distance) of the earliest-added hash within max_distance, else None."""
        best = None
        for (mask, shift), bucket in zip(self.masks, self.buckets):
            for i in bucket.get((h & mask) >> shift, ()):
                d = (self.hashes[i] ^ h).bit_count()
                if d <= self.max_distance and (best is None or i < best[0]):
                    best = (i, d)
        return best

    def add(self, h: int, name: str) -> None:
        idx = len(self.hashes)
        self.hashes.append(h)
        self.names.append(name)
        for (mask, shift), bucket in zip(self.masks, self.buckets):
            bucket.setdefault((h & mask) >> shift, []).append(idx)


@dataclass
class NearDedupConfig:
    """Perceptual near-duplicates (resized, recompressed, lightly edited copies)."""

    enabled: bool = True
    """Run this stage."""
    hash: str = "phash"
    """imagehash function: phash, dhash, ahash or whash."""
    hash_size: int = 8
    """Hash side: hash_size**2 bits."""
    max_distance: int = 4
    """Largest Hamming distance between hashes that still counts as a duplicate."""


class NearDedup(FilterStage):
    """Keeps the first image of each group of perceptually equal images, in input order.

    A sample is compared with the kept ones only, so a chain a~b~c where a and c are far apart
    keeps a and c (the first of each group, groups formed greedily in input order)."""

    name = "near_dedup"

    def __init__(self, cfg: NearDedupConfig):
        import imagehash

        if cfg.hash not in ("phash", "dhash", "ahash", "whash"):
            raise ValueError(f"near_dedup.hash must be phash, dhash, ahash or whash, got {cfg.hash!r}")
        self.cfg = cfg
        self.fn = getattr(imagehash, "average_hash" if cfg.hash == "ahash" else cfg.hash)
        self.index = BandIndex(cfg.hash_size * cfg.hash_size, cfg.max_distance)

    def hash_of(self, sample: FilterSample) -> int:
        bits = self.fn(sample.image(), hash_size=self.cfg.hash_size).hash.flatten()
        return int("".join("1" if b else "0" for b in bits), 2)

    def process(self, sample: FilterSample) -> Optional[Reject]:
        h = self.hash_of(sample)
        hit = self.index.query(h)
        if hit is not None:
            i, d = hit
            sample.scores["near_distance"] = d
            return Reject("near_duplicate", f"hamming {d} to {self.index.names[i]}")
        self.index.add(h, sample.where)
        return None
