"""Merging the shards of one sharded preprocessing run into a single prefix.

Shard I of S packed the blocks b with b % S == I, each block independently, and recorded its
block table (block id, rows, rejects) in meta.json. Interleaving the shards' blocks by block id
therefore reproduces the single-machine run exactly, byte for byte.
"""

from __future__ import annotations

import json
from collections import Counter

from megatron_sail.data import indexed
from megatron_sail.data.preprocess.packing import ImageEntry, Sample
from megatron_sail.data.preprocess.pipeline import writer_stats

MUST_MATCH = ("format", "version", "seq_length", "input_format", "tokenizer", "tiling", "template", "packing")


def _check_shards(metas: list[dict], prefixes: list[str]) -> None:
    """All shards come from one run, and every shard is present exactly once."""
    for key in MUST_MATCH:
        for p, m in zip(prefixes[1:], metas[1:]):
            if m.get(key) != metas[0].get(key):
                raise ValueError(f"{p}: '{key}' differs from {prefixes[0]}; not shards of one run")
    counts = {m["shard"]["num_shards"] for m in metas}
    if len(counts) != 1:
        raise ValueError(f"shards disagree on num_shards: {sorted(counts)}")
    got = sorted(m["shard"]["index"] for m in metas)
    if got != list(range(counts.pop())):
        raise ValueError(f"need each shard index exactly once, got {got}")


def _block_rows(reader: indexed.PackedReader, first_row: int, n: int) -> list[list[Sample]]:
    """Samples of n consecutive rows, rebuilt from the stored arrays."""
    rows = []
    for i in range(first_row, first_row + n):
        first, toks, masks, image_ids = reader.row(i)
        samples = [Sample(t.copy(), m.copy(), []) for t, m in zip(toks, masks)]
        for j in image_ids:
            cols, nrows, thumb, w, h, s = (int(v) for v in reader.image_meta[j])
            samples[s - first].images.append(
                ImageEntry(reader.image_bytes(j), (cols, nrows), bool(thumb), (w, h))
            )
        rows.append(samples)
    return rows


def merge_shards(prefixes: list[str], output_prefix: str) -> dict:
    """Write the merged dataset to output_prefix; returns its stats."""
    readers = [indexed.PackedReader(p) for p in prefixes]
    metas = [r.meta for r in readers]
    _check_shards(metas, prefixes)
    rejects_lines = [indexed.read_rejects(p) for p in prefixes]
    table = []  # (block id, shard, first row, rows, first reject, rejects)
    for s, m in enumerate(metas):
        row, rej = 0, 0
        for block, n_rows, n_rej in m["blocks"]:
            table.append((block, s, row, n_rows, rej, n_rej))
            row, rej = row + n_rows, rej + n_rej
    table.sort()
    img_context = metas[0]["tokenizer"]["img_context_id"]
    with indexed.PackedWriter(output_prefix) as writer:
        for block, s, row, n_rows, rej, n_rej in table:
            for samples in _block_rows(readers[s], row, n_rows):
                writer.add_row(samples, img_context)
            for line in rejects_lines[s][rej : rej + n_rej]:
                r = json.loads(line)
                writer.add_reject(r["source"], r["key"], r["reason"], r["detail"])
            writer.end_block(block)
        rejects = Counter()
        for m in metas:
            rejects.update(m["rejects"])
        meta = dict(metas[0])
        meta["stats"] = writer_stats(
            writer, sum(m["stats"]["records"] for m in metas), int(meta["seq_length"])
        )
        meta["rejects"] = dict(sorted(rejects.items()))
        meta["shard"] = {"index": 0, "num_shards": 1}
        meta["blocks"] = writer.blocks
        writer.commit(meta)
    return meta["stats"]
