#!/usr/bin/env python
"""Benchmark of the dedup grouping pass on synthetic signatures with planted duplicate groups.

    python tools/bench_dedup.py --signatures 1000000 [--partitions P] [--partition-rows R]

Writes N synthetic signature rows as shards (random 256-bit pHashes and SHA-256s; every
``--stride``-th row is the base of a group with one or two copies placed in shards far away:
some byte-identical, the others with 1..--max-flips pHash bits flipped and half the pixels, as a
resized re-encode), runs the grouping pass (curate/dedup/grouping.py) and checks the planted
groups: recall = planted copies found in their group's drop list / planted copies, precision =
correct drops / all drops. ``--brute-force`` (small N, e.g. 10,000) also compares the groups with
an all-pairs search and reports recall and precision of the grouped rows against it (1.0 with
``--bands`` > ``--max-distance``, the exact search; below with fewer, wider bands). The last line is ``rows_per_s=X peak_rss_mb=Y recall=R`` (rows per
second of the grouping pass; peak RSS of this process, generation included).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_sail.curate.dedup.grouping import GroupConfig, _mix, connected_components, hamming, run_grouping  # noqa: E402
from megatron_sail.curate.dedup.sigfile import SUFFIX  # noqa: E402
from megatron_sail.curate.writer import DONE_DIR, done_marker, write_atomic  # noqa: E402


class Synthetic:
    """Every row is a function of its id (no state): random rows, group bases, copies."""

    def __init__(self, n: int, stride: int, words: int, max_flips: int, seed: int):
        self.n, self.stride, self.words, self.max_flips = n, stride, words, max_flips
        self.seed = np.uint64(seed * 0x100000001B3 + 1)
        self.groups = n // stride
        self.mult = self._coprime(self.groups)

    @staticmethod
    def _coprime(g: int) -> int:
        m = 7919
        while g and np.gcd(m, g) != 1:
            m += 2
        return m

    def _h(self, ids: np.ndarray, salt: int) -> np.ndarray:
        return _mix(ids.astype(np.uint64) * np.uint64(4099) + np.uint64(salt) + self.seed)

    def base_of(self, ids: np.ndarray) -> np.ndarray:
        """The base id a copy slot copies, -1 for rows that are not copies."""
        g, slot = ids // self.stride, ids % self.stride
        is_copy = ((slot == 1) | ((slot == 2) & (g % 2 == 0))) & (g < self.groups)
        perm = (g * self.mult + slot * 13) % max(self.groups, 1)
        return np.where(is_copy, perm * self.stride, -1)

    def rows(self, ids: np.ndarray) -> dict:
        base = self.base_of(ids)
        src = np.where(base >= 0, base, ids)
        phash = np.stack([self._h(src, 11 + w) for w in range(self.words)], axis=1)
        sha_src = src.copy()
        exact = (base >= 0) & (self._h(ids, 5) % np.uint64(3) == 0)
        sha_src[(base >= 0) & ~exact] = ids[(base >= 0) & ~exact]
        sha = np.stack([self._h(sha_src, 21 + w) for w in range(4)], axis=1).astype(">u8").view(np.uint8)
        pixels = (200_000 + (self._h(src, 31) % np.uint64(800_000))).astype(np.int64)
        near = (base >= 0) & ~exact
        pixels[near] //= 2
        flips = 1 + (self._h(ids, 41) % np.uint64(self.max_flips)).astype(np.int64)
        for f in range(self.max_flips):  # flip distinct bits: bit positions from the row's hash
            bits = 64 * self.words
            pos = ((self._h(ids, 51 + f) % np.uint64(bits)).astype(np.int64) + f * 7) % bits
            on = near & (flips > f)
            w, b = pos[on] // 64, pos[on] % 64
            phash[np.flatnonzero(on), w] ^= np.uint64(1) << b.astype(np.uint64)
        return {
            "keys": np.char.encode(ids.astype(str), "ascii"),
            "sha256": sha.reshape(len(ids), 32),
            "phash": phash.astype(np.uint64),
            "phash_ok": np.ones(len(ids), np.uint8),
            "pixels": pixels,
        }


def write_signatures(syn: Synthetic, folder: str, shard_rows: int) -> list[str]:
    os.makedirs(os.path.join(folder, DONE_DIR), exist_ok=True)
    names = []
    for k, lo in enumerate(range(0, syn.n, shard_rows)):
        name = f"{k:06d}"
        ids = np.arange(lo, min(lo + shard_rows, syn.n), dtype=np.int64)
        buf = io.BytesIO()
        np.savez(buf, **syn.rows(ids))
        write_atomic(os.path.join(folder, name + SUFFIX), buf.getvalue())
        write_atomic(
            done_marker(folder, name), json.dumps({"samples": len(ids), "signed": len(ids)}).encode()
        )
        names.append(name)
    return names


def score(syn: Synthetic, keep_dir: str, names: list[str], chunk: int = 1 << 20) -> tuple[float, float, int]:
    """(recall, precision, drops) of the planted groups; streamed, so the check itself stays
    within the grouping's memory."""

    def group(ids: np.ndarray) -> np.ndarray:  # planted group = its base id (others: their own)
        base = syn.base_of(ids)
        return np.where(base >= 0, base, ids)

    planted = sum(
        int((syn.base_of(np.arange(lo, min(lo + chunk, syn.n))) >= 0).sum()) for lo in range(0, syn.n, chunk)
    )
    correct = drops = 0
    for name in names:
        with open(os.path.join(keep_dir, name + ".dropped.jsonl"), encoding="utf-8") as f:
            pairs = [(int(d["key"]), int(d["survivor"].split("/", 1)[1])) for d in map(json.loads, f)]
        if pairs:
            a, b = (np.array(x, np.int64) for x in zip(*pairs))
            correct += int(((group(a) == group(b)) & (a != b)).sum())
            drops += len(pairs)
    return (correct / planted if planted else 1.0), (correct / drops if drops else 1.0), drops


def brute_force_check(syn: Synthetic, keep_dir: str, names: list[str], max_distance: int) -> dict:
    """The grouping against an all-pairs search: rows in a duplicate group (a component of the
    pairs within ``max_distance`` or with equal SHA-256, size > 1) by brute force versus in a
    group by the grouping pass. Recall and precision over those rows; ``equals_brute_force``
    when the two sets of grouped rows are the same."""
    ids = np.arange(syn.n, dtype=np.int64)
    r = syn.rows(ids)
    a, b = [], []
    for i in range(syn.n - 1):
        d = hamming(np.repeat(r["phash"][i : i + 1], syn.n - i - 1, axis=0), r["phash"][i + 1 :])
        same = (r["sha256"][i + 1 :] == r["sha256"][i]).all(axis=1)
        j = np.flatnonzero((d <= max_distance) | same) + i + 1
        a += [i] * len(j)
        b += list(j)
    label = connected_components(syn.n, np.array(a, np.int64), np.array(b, np.int64))
    sizes = np.bincount(label, minlength=syn.n)
    want = {int(i) for i in ids[sizes[label] > 1]}
    got = set()
    for name in names:
        with open(os.path.join(keep_dir, name + ".dropped.jsonl"), encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                got |= {int(d["key"]), int(d["survivor"].split("/", 1)[1])}
    both = len(got & want)
    return {
        "equals_brute_force": got == want,
        "brute_force_grouped_rows": len(want),
        "brute_force_recall": round(both / len(want), 4) if want else 1.0,
        "brute_force_precision": round(both / len(got), 4) if got else 1.0,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_dedup.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--signatures", type=int, required=True, metavar="N", help="synthetic signature rows")
    p.add_argument(
        "--partitions",
        type=int,
        default=0,
        metavar="P",
        help="partitions (default: 0, from --partition-rows)",
    )
    p.add_argument(
        "--partition-rows",
        type=int,
        default=1_000_000,
        metavar="N",
        help="records per partition (default: 1000000)",
    )
    p.add_argument(
        "--shard-rows",
        type=int,
        default=10_000,
        metavar="N",
        help="rows per signature shard (default: 10000)",
    )
    p.add_argument(
        "--stride", type=int, default=50, metavar="N", help="a planted group every N rows (default: 50)"
    )
    p.add_argument(
        "--hash-bits", type=int, default=256, choices=(64, 256), help="pHash bits: 64 or 256 (default: 256)"
    )
    p.add_argument(
        "--max-distance",
        type=int,
        default=7,
        metavar="D",
        help="near-duplicate Hamming distance (default: 7)",
    )
    p.add_argument(
        "--bands",
        type=int,
        default=8,
        metavar="B",
        help="LSH bands; > --max-distance is the exact search (default: 8)",
    )
    p.add_argument(
        "--max-flips",
        type=int,
        default=3,
        metavar="N",
        help="pHash bits flipped in a near copy, 1..N (default: 3)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the synthetic rows (default: 0)")
    p.add_argument(
        "--brute-force", action="store_true", help="also compare with all pairs (N <= 20000; default: off)"
    )
    p.add_argument(
        "--workdir", metavar="DIR", help="where the shards go (default: a temporary folder, removed)"
    )
    a = p.parse_args(argv)
    root = a.workdir or tempfile.mkdtemp(prefix="bench_dedup_")
    try:
        syn = Synthetic(a.signatures, a.stride, a.hash_bits // 64, a.max_flips, a.seed)
        t0 = time.perf_counter()
        names = write_signatures(syn, os.path.join(root, "sig"), a.shard_rows)
        gen_s = time.perf_counter() - t0
        report = run_grouping(
            GroupConfig(
                signatures=os.path.join(root, "sig"),
                output_dir=os.path.join(root, "keep"),
                max_distance=a.max_distance,
                bands=a.bands,
                partitions=a.partitions,
                partition_rows=a.partition_rows,
            )
        )
        recall, precision, drops = score(syn, os.path.join(root, "keep"), names)
        disk = sum(
            os.path.getsize(os.path.join(root, "sig", f))
            for f in os.listdir(os.path.join(root, "sig"))
            if f.endswith(SUFFIX)
        )
        out = {
            "rows": a.signatures,
            "partitions": report["partitions"],
            "generate_s": round(gen_s, 1),
            "group_s": report["seconds"],
            "drops": drops,
            "groups": report["groups"],
            "precision": precision,
            "signature_bytes_per_row": round(disk / a.signatures, 1),
            "records": report["records"],
        }
        if a.brute_force:
            if a.signatures > 20000:
                p.error("--brute-force needs --signatures <= 20000")
            out.update(brute_force_check(syn, os.path.join(root, "keep"), names, a.max_distance))
        print(json.dumps(out))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"rows_per_s={report['rows_per_s']:.0f} peak_rss_mb={peak:.0f} recall={recall:.4f}")
    finally:
        if not a.workdir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
