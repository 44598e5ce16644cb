"""The grouping pass: signature shards in, a keep-list and a dropped-list per shard out, with
memory bounded by the partition size rather than by the number of images.

Steps (all on disk under a work folder, removed at the end):

1. **Scatter.** Every signature shard is read once, in shard-name order; row r of the k-th
   shard gets the global id ``offset[k] + r``. Each row emits one *exact* record keyed by its
   SHA-256 and, when near dedup is on, one *near* record per LSH band keyed by (band, the band's
   bits). A record goes to partition ``key % P``, so equal keys always meet in one partition.
2. **Candidates per partition.** One partition at a time is loaded and sorted by key; rows with
   an equal key are compared: exact records by their full SHA-256, near records by the Hamming
   distance of their whole pHash (``<= max_distance``). Verified pairs are written as edges.
   Semantic dedup (optional) assigns every embedding to its nearest k-means centroid and
   compares the members of each cluster by cosine similarity (NeMo Curator's semdedup).
3. **Union-find** over the edges (only ids that have an edge take memory: a few dozen bytes
   per duplicate, not per image), then the survivor of each group: the largest image
   (width x height), ties broken by the smallest global id, i.e. the first by shard name and
   then input order. Every other member is dropped with the reason ``exact_duplicate`` (same
   SHA-256 as the survivor), ``near_duplicate`` (linked by pHash) or ``semantic_duplicate``.
4. **Lists.** Per shard, in shard order: ``NAME.keep.txt`` (kept keys, input order) and
   ``NAME.dropped.jsonl`` (key, reason, survivor as ``shard/key``, Hamming distance of its
   closest near link), then ``dedup_report.json``.

The groups are the connected components of the verified pairs, so the result does not depend
on the number of partitions or of signature workers: the lists are the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_sail.curate.dedup.partitions import EDGE, EXACT, NEAR, SEMANTIC, Partitions
from megatron_sail.curate.dedup.semantic import semantic_pairs
from megatron_sail.curate.dedup.sigfile import COLOUR_CELLS, SUFFIX, load_signatures
from megatron_sail.curate.writer import DONE_DIR, write_atomic

REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate", SEMANTIC: "semantic_duplicate"}
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class GroupConfig:
    """What is grouped and how the work is cut."""

    signatures: str = ""
    """Folder of the signature pass (NAME.sig.npz + done/)."""
    output_dir: str = ""
    """Where NAME.keep.txt, NAME.dropped.jsonl and dedup_report.json go."""
    exact: bool = True
    """Group byte-identical images."""
    near: bool = True
    """Group pHash near-duplicates."""
    max_distance: int = 4
    """Largest Hamming distance of a near-duplicate pair."""
    bands: int = 0
    """LSH bands (0: max_distance + 1, exact by pigeonhole)."""
    colour_distance: Optional[int] = None
    """Near pairs must also have 8x8 RGB thumbnails within this per-cell difference (None: pHash
    alone; the signatures must then hold ``colour``: near_dedup.colour_distance set there too)."""
    semantic: bool = False
    """Group CLIP-embedding semantic duplicates (needs embeddings in the signatures)."""
    clusters: int = 16
    """k-means clusters of semantic dedup."""
    threshold: float = 0.95
    """Cosine similarity of a semantic-duplicate pair."""
    kmeans_iters: int = 20
    """Lloyd iterations."""
    kmeans_sample: int = 200_000
    """Rows the centroids are trained on (the first in shard order)."""
    seed: int = 0
    """Seed of the centroid initialisation."""
    partition_rows: int = 1_000_000
    """Records per partition (the memory bound: ~60 bytes each while a partition is sorted)."""
    partitions: int = 0
    """Number of partitions (0: from partition_rows)."""
    expected_shards: Optional[list] = None
    """Shard names that must all have signatures (an incomplete pass is an error)."""
    work_dir: Optional[str] = None
    """Scratch folder (default OUTPUT/_work); removed at the end."""
    buffer_records: int = 1 << 18
    """Records buffered before the scatter writes them out."""

    def band_count(self, bits: int) -> int:
        n = self.bands or self.max_distance + 1
        if not 1 <= n <= bits:
            raise ValueError(f"bands {n} must be in [1, {bits}] (the hash's bits)")
        return n


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads keys evenly over partitions."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def band_edges(bits: int, bands: int) -> list[tuple[int, int]]:
    edges = [round(i * bits / bands) for i in range(bands + 1)]
    return list(zip(edges, edges[1:]))


def band_keys(phash: np.ndarray, bands: list[tuple[int, int]]) -> np.ndarray:
    """[n, bands] uint64 keys: each band's bits, mixed with the band's number. Bands on byte
    boundaries are read from the bytes directly; others through the unpacked bits."""
    n = phash.shape[0]
    raw = np.ascontiguousarray(phash.astype(">u8")).view(np.uint8).reshape(n, -1)
    bits = None
    out = np.empty((n, len(bands)), np.uint64)
    for j, (lo, hi) in enumerate(bands):
        width = hi - lo
        if lo % 8 == 0 and hi % 8 == 0:
            packed = raw[:, lo // 8 : hi // 8]
        else:
            if bits is None:
                bits = np.unpackbits(raw, axis=1)
            packed = np.packbits(bits[:, lo:hi], axis=1)  # zero-padded on the right
        value = np.zeros(n, np.uint64)
        for c in range(packed.shape[1]):
            value = (value << np.uint64(8)) | packed[:, c].astype(np.uint64)
        salt = np.uint64(((j + 1) * int(_MIX) + width) & 0xFFFFFFFFFFFFFFFF)
        out[:, j] = _mix(value ^ salt)
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance of uint64 word arrays [n, w]."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=1, dtype=np.int64)


def _done_shards(sig_dir: str) -> list[str]:
    folder = os.path.join(sig_dir, DONE_DIR)
    names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json")) if os.path.isdir(folder) else []
    return [n for n in names if os.path.isfile(os.path.join(sig_dir, n + SUFFIX))]


class Grouper:
    """Runs the grouping pass (see the module docstring)."""

    def __init__(self, cfg: GroupConfig):
        self.cfg = cfg
        self.shards = _done_shards(cfg.signatures)
        if cfg.expected_shards is not None:
            missing = sorted(set(cfg.expected_shards) - set(self.shards))
            if missing:
                raise ValueError(
                    f"{cfg.signatures}: no signatures for shard(s) {', '.join(missing[:5])}"
                    f"{' ...' if len(missing) > 5 else ''}: finish the signature pass first"
                )
            self.shards = sorted(cfg.expected_shards)
        if not self.shards:
            raise ValueError(f"{cfg.signatures}: no finished signature shards")
        self.work = cfg.work_dir or os.path.join(cfg.output_dir, "_work")

    def _sig(self, name: str, embedding: bool = False) -> dict:
        return load_signatures(os.path.join(self.cfg.signatures, name + SUFFIX), embedding)

    def run(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        os.makedirs(cfg.output_dir, exist_ok=True)
        if os.path.isdir(self.work):
            shutil.rmtree(self.work)
        os.makedirs(self.work)
        try:
            counts = self._scatter()
            edge_path = os.path.join(self.work, "edges.bin")
            with open(edge_path, "wb") as edges:
                pairs = self._candidates(edges)
                if cfg.semantic:
                    pairs["semantic"] = self._semantic(edges)
            dropped = self._components(edge_path)
            by_reason = self._write_lists(dropped)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
        seconds = time.perf_counter() - start
        report = {
            "signatures": cfg.signatures,
            "shards": len(self.shards),
            "rows": int(self.n),
            "kept": int(self.n - len(dropped["id"])),
            "dropped": int(len(dropped["id"])),
            "dropped_by_reason": by_reason,
            "groups": int(dropped["groups"]),
            "partitions": self.partitions,
            "records": counts,
            "verified_pairs": pairs,
            "settings": {
                "exact": cfg.exact,
                "near": cfg.near,
                "max_distance": cfg.max_distance,
                "bands": self.bands if cfg.near else None,
                "colour_distance": cfg.colour_distance if cfg.near else None,
                "semantic": cfg.semantic,
                "clusters": cfg.clusters if cfg.semantic else None,
                "threshold": cfg.threshold if cfg.semantic else None,
            },
            "survivor_rule": "largest width*height, then first by shard name and input order",
            "seconds": round(seconds, 3),
            "rows_per_s": round(self.n / seconds, 1) if seconds > 0 else None,
        }
        write_atomic(os.path.join(cfg.output_dir, "dedup_report.json"), json.dumps(report, indent=1).encode())
        return report

    # ---------------------------------------------------------------- 1. scatter
    def _scatter(self) -> dict:
        cfg = self.cfg
        sizes = []
        words = None
        for name in self.shards:  # headers only would do; the arrays are small per shard
            s = self._sig(name)
            sizes.append(len(s["keys"]))
            words = s["phash"].shape[1] if words is None else words
            if s["phash"].shape[1] != words:
                raise ValueError(
                    f"{name}{SUFFIX}: pHash of {s['phash'].shape[1] * 64} bits, others have {words * 64}"
                )
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.words = words or 1
        bits = 64 * self.words
        self.bands = cfg.band_count(bits) if cfg.near else 0
        self.band_ranges = band_edges(bits, self.bands) if cfg.near else []
        per_row = int(cfg.exact) + self.bands
        self.partitions = cfg.partitions or max(1, math.ceil(self.n * per_row / cfg.partition_rows))
        self.exact_dtype = np.dtype([("key", "<u8"), ("id", "<i8"), ("pixels", "<i8"), ("sha", "u1", (32,))])
        near_fields = [("key", "<u8"), ("id", "<i8"), ("pixels", "<i8"), ("phash", "<u8", (self.words,))]
        if cfg.colour_distance is not None:
            near_fields.append(("colour", "u1", (COLOUR_CELLS,)))
        self.near_dtype = np.dtype(near_fields)
        ex = Partitions(self.work, "exact", self.partitions, self.exact_dtype, cfg.buffer_records)
        nr = Partitions(self.work, "near", self.partitions, self.near_dtype, cfg.buffer_records)
        counts = {"exact": 0, "near": 0}
        for k, name in enumerate(self.shards):
            s = self._sig(name)
            n = len(s["keys"])
            if not n:
                continue
            ids = np.arange(self.offsets[k], self.offsets[k] + n, dtype=np.int64)
            if cfg.exact:
                rec = np.empty(n, self.exact_dtype)
                rec["key"] = _mix(s["sha256"][:, :8].copy().view(">u8")[:, 0].astype(np.uint64))
                rec["id"], rec["pixels"], rec["sha"] = ids, s["pixels"], s["sha256"]
                ex.add((rec["key"] % np.uint64(self.partitions)).astype(np.int64), rec)
                counts["exact"] += n
            ok = s["phash_ok"].astype(bool)
            if cfg.near and ok.any():
                keys = band_keys(s["phash"][ok], self.band_ranges)
                m = int(ok.sum())
                rec = np.empty((m, self.bands), self.near_dtype)
                rec["key"] = keys
                rec["id"] = ids[ok][:, None]
                rec["pixels"] = s["pixels"][ok][:, None]
                rec["phash"] = s["phash"][ok][:, None, :]
                if cfg.colour_distance is not None:
                    rec["colour"] = self._colour(name, s)[ok][:, None, :]
                rec = rec.reshape(-1)
                nr.add((rec["key"] % np.uint64(self.partitions)).astype(np.int64), rec)
                counts["near"] += len(rec)
        ex.flush()
        nr.flush()
        self.exact_parts, self.near_parts = ex, nr
        return counts

    def _colour(self, name: str, s: dict) -> np.ndarray:
        """A shard's colour thumbnails; a one-line error when the signature pass made none."""
        if "colour" not in s or s["colour"].shape[1:] != (COLOUR_CELLS,):
            raise ValueError(
                f"{name}{SUFFIX}: no colour thumbnails; rerun the signature pass with "
                "near_dedup.colour_distance set, as for grouping"
            )
        return s["colour"]

    # ---------------------------------------------------------------- 2. candidate pairs
    def _candidates(self, edges) -> dict:
        verified = {"exact": 0, "near": 0}
        for p in range(self.partitions):
            if self.cfg.exact:
                e = self._pairs(self.exact_parts.load(p), EXACT)
                e.tofile(edges)
                verified["exact"] += len(e)
            if self.cfg.near:
                e = self._pairs(self.near_parts.load(p), NEAR)
                e.tofile(edges)
                verified["near"] += len(e)
        return verified

    def _pairs(self, rec: np.ndarray, kind: int) -> np.ndarray:
        """Verified pairs among records of equal key (in one partition)."""
        if len(rec) < 2:
            return np.zeros(0, EDGE)
        # records were appended in id order, so a stable sort by key gives (key, id) order; only
        # the keys are sorted, the records are gathered for candidate pairs only
        order = np.argsort(rec["key"], kind="stable")
        keys = rec["key"][order]
        same = keys[1:] == keys[:-1]
        if not same.any():
            return np.zeros(0, EDGE)
        starts = np.flatnonzero(np.concatenate([[True], ~same]))
        lengths = np.diff(np.concatenate([starts, [len(keys)]]))
        a_idx, b_idx = [], []
        for m in np.unique(lengths[lengths > 1]):  # all runs of one length at once
            i, j = np.triu_indices(int(m), k=1)
            s0 = starts[lengths == m][:, None]
            a_idx.append((s0 + i).ravel())
            b_idx.append((s0 + j).ravel())
        a_i, b_i = order[np.concatenate(a_idx)], order[np.concatenate(b_idx)]
        ra, rb = rec[a_i], rec[b_i]
        if kind == EXACT:
            dist = np.zeros(len(a_i), np.int64)
            ok = (ra["sha"] == rb["sha"]).all(axis=1)
        else:
            dist = hamming(ra["phash"], rb["phash"])
            ok = dist <= self.cfg.max_distance
            if self.cfg.colour_distance is not None and ok.any():
                diff = np.abs(ra["colour"][ok].astype(np.int16) - rb["colour"][ok].astype(np.int16))
                ok[ok] = diff.max(axis=1) <= self.cfg.colour_distance
            ok[ok] = self._first_shared_band(ra[ok], rb[ok])
        out = np.zeros(int(ok.sum()), EDGE)
        out["a"], out["b"], out["kind"], out["dist"] = ra["id"][ok], rb["id"][ok], kind, dist[ok]
        out["pa"], out["pb"] = ra["pixels"][ok], rb["pixels"][ok]
        return out

    def _first_shared_band(self, ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
        """Whether each pair's record comes from the first band the two hashes share: a pair
        that agrees on several bands meets in several partitions, and only one of them writes
        its edge (so the edges, and memory, grow with the duplicates, not with the bands)."""
        if not len(ra):
            return np.zeros(0, bool)
        ka, kb = band_keys(ra["phash"], self.band_ranges), band_keys(rb["phash"], self.band_ranges)
        first = np.argmax(ka == kb, axis=1)  # a verified pair shares at least the band it met in
        this = np.argmax(ka == ra["key"][:, None], axis=1)
        return this == first

    # ---------------------------------------------------------------- semantic
    def _semantic(self, edges) -> int:
        return semantic_pairs(self, edges)

    # ---------------------------------------------------------------- 3. components
    def _components(self, edge_path: str) -> dict:
        """Union-find over the edges -> the dropped rows: id, survivor id, reason, distance."""
        edges = np.fromfile(edge_path, dtype=EDGE)
        empty = {
            "id": np.zeros(0, np.int64),
            "survivor": np.zeros(0, np.int64),
            "reason": np.zeros(0, np.int64),
            "dist": np.zeros(0, np.int64),
            "groups": 0,
        }
        if not len(edges):
            return empty
        nodes = np.unique(np.concatenate([edges["a"], edges["b"]]))
        a = np.searchsorted(nodes, edges["a"])
        b = np.searchsorted(nodes, edges["b"])
        pixels = np.zeros(len(nodes), np.int64)
        pixels[a], pixels[b] = edges["pa"], edges["pb"]
        kinds = np.zeros(len(nodes), np.int64)
        np.bitwise_or.at(kinds, a, edges["kind"])
        np.bitwise_or.at(kinds, b, edges["kind"])
        dist = np.full(len(nodes), np.iinfo(np.int64).max)
        near = edges["kind"] == NEAR
        np.minimum.at(dist, a[near], edges["dist"][near])
        np.minimum.at(dist, b[near], edges["dist"][near])
        label = connected_components(len(nodes), a, b)
        exact = edges["kind"] == EXACT
        exact_label = connected_components(len(nodes), a[exact], b[exact])
        # survivor: largest pixels, then smallest id (nodes are sorted by id)
        order = np.lexsort((np.arange(len(nodes)), -pixels, label))
        first = np.concatenate([[True], label[order][1:] != label[order][:-1]])
        survivor_of_label = np.empty(len(nodes), np.int64)
        survivor_of_label[label[order][first]] = order[first]
        surv = survivor_of_label[label]
        drop = np.flatnonzero(surv != np.arange(len(nodes)))
        reason = np.where(
            exact_label[drop] == exact_label[surv[drop]], EXACT, np.where(kinds[drop] & NEAR, NEAR, SEMANTIC)
        )
        d = np.where(reason == NEAR, dist[drop], -1)
        return {
            "id": nodes[drop],
            "survivor": nodes[surv[drop]],
            "reason": reason,
            "dist": d,
            "groups": int(first.sum()),
        }

    # ---------------------------------------------------------------- 4. lists
    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return shard, ids - self.offsets[shard]

    def _write_lists(self, dropped: dict) -> dict:
        """Per shard, in order: NAME.keep.txt and NAME.dropped.jsonl; returns counts by reason."""
        # survivor names as numpy arrays (sorted ids, their shard and key), not Python strings
        surv_ids = np.unique(dropped["survivor"])
        s_shard, s_row = self._locate(surv_ids)
        surv_key = np.zeros(len(surv_ids), "S1")
        for k in np.unique(s_shard):
            keys = self._sig(self.shards[k])["keys"]
            sel = s_shard == k
            if keys.itemsize > surv_key.itemsize:
                surv_key = surv_key.astype(keys.dtype)
            surv_key[sel] = keys[s_row[sel]]

        def survivor_name(i: int) -> str:
            j = int(np.searchsorted(surv_ids, i))
            return f"{self.shards[int(s_shard[j])]}/{surv_key[j].decode('ascii')}"

        order = np.argsort(dropped["id"], kind="stable")
        d_ids = dropped["id"][order]
        d_shard, d_row = self._locate(d_ids)
        by_reason: dict[str, int] = {}
        for k, name in enumerate(self.shards):
            keys = self._sig(name)["keys"]
            sel = order[d_shard == k]
            rows = d_row[d_shard == k]
            is_dropped = np.zeros(len(keys), bool)
            is_dropped[rows] = True
            lines = []
            for j, r in zip(sel, rows):
                reason = REASONS[int(dropped["reason"][j])]
                by_reason[reason] = by_reason.get(reason, 0) + 1
                dist = int(dropped["dist"][j])
                lines.append(
                    json.dumps(
                        {
                            "key": keys[r].decode("ascii"),
                            "reason": reason,
                            "survivor": survivor_name(int(dropped["survivor"][j])),
                            "distance": dist if dist >= 0 else None,
                        }
                    )
                    + "\n"
                )
            keep = "".join(k_.decode("ascii") + "\n" for k_ in keys[~is_dropped])
            write_atomic(os.path.join(self.cfg.output_dir, name + ".dropped.jsonl"), "".join(lines).encode())
            write_atomic(os.path.join(self.cfg.output_dir, name + ".keep.txt"), keep.encode())
        return dict(sorted(by_reason.items()))


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label per node (the smallest node index in it): min-label propagation along
    the edges plus pointer jumping, in numpy (a union-find over the edge list)."""
    label = np.arange(n, dtype=np.int64)
    if not len(a):
        return label
    while True:
        m = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        while True:  # pointer jumping: follow labels to their roots
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return label
        label = new


def run_grouping(cfg: GroupConfig) -> dict:
    """The grouping pass; returns its report (also written as dedup_report.json)."""
    return Grouper(cfg).run()
