"""Deduplication inside filter_data: the settings of the global dedup passes and the stage that
applies their result.

Global dedup runs as separate passes (megatron_sail/curate/dedup/, tools/dedup.py):
signatures per shard -> grouping over all shards -> a keep-list per shard. In filter_data the
``dedup`` stage applies those lists: a sample the grouping dropped is a reject
(``exact_duplicate``, ``near_duplicate`` or ``semantic_duplicate``) naming the survivor. Its
position in the filter list matters: the stages before it also run in the signature pass, so
a sample they reject never enters a duplicate group (the survivor of a group is always a usable
sample), and the stages after it (CLIP, judge: the expensive ones) never spend time on a
duplicate.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from megatron_sail.curate.filters.base import FilterSample, FilterStage, Reject


@dataclass
class ExactDedupConfig:
    """Byte-identical images (SHA-256 of the encoded bytes)."""

    enabled: bool = True
    """Group byte-identical images."""


@dataclass
class NearDedupConfig:
    """Perceptual near-duplicates (resized, recompressed copies): pHash within a Hamming distance,
    found by LSH banding over the hash bits."""

    enabled: bool = True
    """Group perceptually equal images."""
    hash_size: int = 8
    """pHash side: hash_size**2 bits (8: 64 bits)."""
    max_distance: int = 4
    """Largest Hamming distance between two hashes that makes them duplicates."""
    bands: int = 0
    """LSH bands the bits are cut into; two hashes are compared when one band is equal. With
    bands > max_distance every pair within max_distance shares a band (pigeonhole): the search
    is exact. 0: max_distance + 1 (exact). Fewer, wider bands keep buckets small at hundreds of
    millions of images at some recall (tools/bench_dedup.py reports it)."""
    colour_distance: Optional[int] = None
    """Also require the two images' 8x8 RGB thumbnails (box averages) to differ by at most this
    much (0-255) in every cell and channel; None: the pHash alone. pHash reads the luminance
    structure only, so a recoloured image (the same shapes in other colours) is a pHash
    duplicate; with this set it is not, while resized and re-encoded copies stay within ~12-20.
    Adds 192 bytes per image to the signatures and to the grouping's near records."""

    def __post_init__(self) -> None:
        if self.colour_distance is not None and not 0 <= self.colour_distance <= 255:
            raise ValueError(f"near_dedup.colour_distance {self.colour_distance} must be in [0, 255]")


@dataclass
class SemanticDedupConfig:
    """Semantic duplicates as NeMo Curator's semdedup: k-means on CLIP image embeddings, then
    pairs inside a cluster whose cosine similarity reaches ``threshold``."""

    enabled: bool = False
    """Off by default: it needs a CLIP model (transformers folder)."""
    model: Optional[str] = None
    """transformers CLIP folder whose image embeddings are compared."""
    clusters: int = 16
    """k of k-means (each cluster must fit in memory in the grouping pass)."""
    threshold: float = 0.95
    """Cosine similarity from which two images in one cluster are duplicates."""
    kmeans_iters: int = 20
    """Lloyd iterations (fixed: the result does not depend on timing)."""
    kmeans_sample: int = 200_000
    """Rows the centroids are trained on (the first ones in shard order)."""
    seed: int = 0
    """Seed of the centroid initialisation."""
    device: str = "cpu"
    """Torch device of the CLIP model in the signature pass."""


DEDUP_REASONS = ("exact_duplicate", "near_duplicate", "semantic_duplicate")


class DedupApply(FilterStage):
    """Rejects the samples the grouping pass dropped (``NAME.dropped.jsonl`` beside
    ``NAME.keep.txt`` in the keep-list folder); a sample in neither list means the lists do not
    belong to this input (``dedup_missing``)."""

    name = "dedup"

    def __init__(self, keep_dir: str):
        self.keep_dir = keep_dir
        self.shard: Optional[str] = None
        self.keep: set[str] = set()
        self.dropped: dict[str, dict] = {}

    def _load(self, shard: str) -> None:
        keep_path = os.path.join(self.keep_dir, shard + ".keep.txt")
        if not os.path.isfile(keep_path):
            raise FileNotFoundError(
                f"no keep-list {keep_path} for shard {shard}: run tools/dedup.py "
                "signatures and group on this input first"
            )
        with open(keep_path, encoding="utf-8") as f:
            self.keep = {ln.rstrip("\n") for ln in f if ln.strip()}
        self.dropped = {}
        drop_path = os.path.join(self.keep_dir, shard + ".dropped.jsonl")
        with open(drop_path, encoding="utf-8") as f:
            for ln in f:
                d = json.loads(ln)
                self.dropped[d["key"]] = d
        self.shard = shard

    def process(self, sample: FilterSample) -> Optional[Reject]:
        if sample.shard != self.shard:
            self._load(sample.shard)
        d = self.dropped.get(sample.key)
        if d is not None:
            dist = f" (hamming {d['distance']})" if d.get("distance") is not None else ""
            return Reject(d["reason"], f"duplicate of {d['survivor']}{dist}")
        if sample.key not in self.keep:
            return Reject(
                "dedup_missing",
                f"{sample.where} is in no keep-list of {self.keep_dir} "
                "(the lists were made from other input)",
            )
        return None


class BandIndex:
    """Hamming-radius search over fixed-width integer hashes by banding (LSH over hash bits).

    The bits are cut into ``max_distance + 1`` bands; two hashes within ``max_distance`` differ
    in at most that many bands, so they agree exactly on at least one (pigeonhole). Candidates
    come from the buckets of equal bands and are then checked by their real distance, so the
    search is exact. An in-memory reference for small sets (the grouping pass does the same
    partitioned on disk)."""

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
