"""The data path at scale, behind tools/bench_data_scale.py: N real packed datasets written
directly in Megatron-Core's .bin/.idx layout (or, with images, through the real PackedWriter), and
their blend read in training order exactly as the trainer does (BatchPlan indices of DP rank 0 ->
BlendedDataset rows -> the PrefetchLoader thread -> collate_rows). Nothing here imports torch at
module level: the tool builds the datasets in a forked child before torch is imported, so the
reader's peak RSS is its own."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

from megatron_sail.compat import indexed as idx_format
from megatron_sail.data import indexed

VOCAB = 256


SPECIAL = {
    "pad_id": 0,
    "img_context_id": 1,
    "img_start_id": 2,
    "img_end_id": 3,
    "im_start_id": 4,
    "im_end_id": 5,
}


GPU_TOKENS_PER_S = 1.5 * 23_800
"""What one GPU consumes at the speed goal: 1.5x transformers' InternVL on an H200 (SAIL-VL-2B
shape, 4 tiles per 4,096-token row: 23.8k tokens/s; docs/performance.md)."""


GPU_FLOPS = 1.5 * 296e12
"""The same goal in model FLOP/s (that HF run did 296 TFLOP/s). Rows with many tiles cost more
FLOPs per token than the 4-tile rows behind the token rate, so this bound is the tighter one."""


CHUNK = 1 << 20
"""Rows written per numpy chunk (bounds the builder's memory)."""


def meta_for(
    seq_length: int, rows: int, samples: int, images: int, tiles: int, tokens: int, image_tokens: int
) -> dict:
    """A meta.json the readers accept (tokenizer block, tiling, stats)."""
    from megatron_sail.data.preprocess.pipeline import stats_dict

    return {
        "format": indexed.FORMAT_NAME,
        "version": indexed.FORMAT_VERSION,
        "seq_length": seq_length,
        "input_format": "synthetic",
        "tokenizer": {
            "path": "synthetic",
            "vocab_size": VOCAB,
            "added": [],
            "tokens_per_tile": 256,
            "tile_size": 448,
            **SPECIAL,
        },
        "tiling": {
            "tile_size": 448,
            "min_tiles": 1,
            "max_tiles": 12,
            "thumbnail": True,
            "tokens_per_tile": 256,
        },
        "stats": stats_dict(
            rows, samples, rows, images, tiles, tokens - image_tokens, image_tokens, 0, seq_length
        ),
        "rejects": {},
        "blocks": [[0, rows, 0]],
    }


def _write_idx(path: str, dtype, rows: int, seq_len: int) -> None:
    """Megatron-Core .idx for ``rows`` documents of one ``seq_len``-item sequence each (no
    sequences at all when seq_len is 0: every document empty), written in chunks."""
    count = rows if seq_len else 0
    itemsize = np.dtype(dtype).itemsize
    with open(path, "wb") as f:
        f.write(idx_format.pack_header(dtype, count, rows + 1))
        for a in range(0, count, CHUNK):
            f.write(np.full(min(count, a + CHUNK) - a, seq_len, dtype=np.int32).tobytes())
        for a in range(0, count, CHUNK):
            f.write((np.arange(a, min(count, a + CHUNK), dtype=np.int64) * seq_len * itemsize).tobytes())
        for a in range(0, rows + 1, CHUNK):
            docs = np.arange(a, min(rows + 1, a + CHUNK), dtype=np.int64)
            f.write((docs if seq_len else np.zeros_like(docs)).tobytes())


def write_text_dataset(prefix: str, rows: int, tokens_per_row: int, seq_length: int, source: int) -> None:
    """``rows`` one-sample text rows, tokens a function of (source, row); files renamed into
    place when complete, meta.json last."""
    tmp = f".tmp{os.getpid()}"
    t = tokens_per_row
    with open(f"{prefix}.tokens.bin{tmp}", "wb") as ft, open(f"{prefix}.loss_mask.bin{tmp}", "wb") as fm:
        mask = np.ones((CHUNK, t), dtype=np.uint8)
        mask[:, -1] = 0
        for a in range(0, rows, CHUNK):
            r = np.arange(a, min(rows, a + CHUNK), dtype=np.int64)[:, None]
            toks = 10 + (source * 131 + r + np.arange(t)) % (VOCAB - 10)
            ft.write(toks.astype(np.int32).tobytes())
            fm.write(mask[: len(r)].tobytes())
    open(f"{prefix}.images.bin{tmp}", "wb").close()
    _write_idx(f"{prefix}.tokens.idx{tmp}", np.int32, rows, t)
    _write_idx(f"{prefix}.loss_mask.idx{tmp}", np.uint8, rows, t)
    _write_idx(f"{prefix}.images.idx{tmp}", np.uint8, rows, 0)
    with open(f"{prefix}.images_meta.npy{tmp}", "wb") as f:
        np.save(f, np.zeros((0, len(indexed.META_COLUMNS)), dtype=np.int32))
    open(f"{prefix}.rejects.jsonl{tmp}", "w").close()
    with open(f"{prefix}.meta.json{tmp}", "w") as f:
        json.dump(meta_for(seq_length, rows, rows, 0, 0, rows * t, 0), f)
    for path in indexed.final_paths(prefix):
        os.replace(path + tmp, path)


def image_sample(jpeg: bytes, words: int, rng: np.random.Generator):
    """One caption-like sample holding one 1024x768 image (4x3 grid + thumbnail = 13 tiles)."""
    from megatron_sail.data.preprocess.packing import ImageEntry, Sample

    s = SPECIAL
    text = rng.integers(10, VOCAB, size=words, dtype=np.int32)
    tokens = np.concatenate(
        [
            [s["im_start_id"], s["img_start_id"]],
            [s["img_context_id"]] * (13 * 256),
            [s["img_end_id"]],
            text,
            [s["im_end_id"]],
        ]
    ).astype(np.int32)
    mask = np.zeros(len(tokens), dtype=np.uint8)
    mask[-words - 2 : -1] = 1  # the caption and <|im_end|> are trained
    return Sample(tokens, mask, [ImageEntry(jpeg, (4, 3), True, (1024, 768))])


def write_image_dataset(prefix: str, rows: int, images_per_row: int, seq_length: int, source: int) -> None:
    """SAIL-VL-shaped rows through the real writer: ``images_per_row`` samples of one 13-tile
    JPEG and a ~60-token caption each (16 distinct photo-like JPEGs, ~230 KB each, reused)."""
    from megatron_sail.data.images.synthetic import synthetic_jpeg

    need = images_per_row * (13 * 256 + 66)
    if need > seq_length:
        raise SystemExit(
            f"{images_per_row} images of 13 tiles need {need} tokens > --seq-length {seq_length}"
        )
    jpegs = [synthetic_jpeg(1024, 768, seed=i) for i in range(min(16, rows * images_per_row))]
    rng = np.random.default_rng(source)
    with indexed.PackedWriter(prefix) as w:
        for r in range(rows):
            w.add_row(
                [
                    image_sample(jpegs[(r * images_per_row + k) % len(jpegs)], 60, rng)
                    for k in range(images_per_row)
                ],
                SPECIAL["img_context_id"],
            )
        w.end_block(0)
        st = w.stats
        meta = meta_for(
            seq_length, rows, w.samples, w.num_images, st["tiles"], st["tokens"], st["image_tokens"]
        )
        meta["stats"]["loss_tokens"] = st["loss_tokens"]
        w.commit(meta)


def build_all(args: argparse.Namespace, prefixes: list[str]) -> None:
    """Write every missing dataset (runs in a child process)."""
    for d, prefix in enumerate(prefixes):
        if indexed.load_meta(prefix) is not None:
            continue
        if args.images_per_row:
            write_image_dataset(prefix, args.rows, args.images_per_row, args.seq_length, d)
        else:
            write_text_dataset(prefix, args.rows, args.tokens_per_row, args.seq_length, d)


def rss_mb() -> tuple[float, float]:
    """(anonymous, file-backed) resident MB of this process now."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                vals[line.split(":")[0]] = int(line.split()[1]) / 1024
    return vals.get("RssAnon", 0.0), vals.get("RssFile", 0.0)


def read_blend(args: argparse.Namespace, prefixes: list[str]) -> dict:
    """Read --read rows in training order through the trainer's StepFeeder; timings."""
    import torch

    from megatron_sail.config import model as model_cfg
    from megatron_sail.config.images import ImageConfig
    from megatron_sail.data.images import build_image_pipeline
    from megatron_sail.data.loading.dataset import BlendedDataset
    from megatron_sail.training.flops import shape_from_model_config
    from megatron_sail.training.loop import BatchPlan, StepFeeder

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    blend = BlendedDataset(prefixes, [1.0] * len(prefixes), seed=1234, verify=args.verify)
    open_s = time.perf_counter() - t0
    plan = BatchPlan(args.global_batch_size, args.micro_batch_size, args.dp_size, 0)
    images = bool(args.images_per_row)
    pipeline = (
        build_image_pipeline(ImageConfig(backend=args.backend, threads=args.threads)) if images else None
    )
    shape = shape_from_model_config(model_cfg.sail_2b(), 448) if images else None
    feeder = StepFeeder(blend, plan, pipeline, 0, shape, depth=2, decode=images)
    per_step = args.global_batch_size // args.dp_size
    feeder.next_step()  # warm-up: the loader thread, the decoder
    rows = tiles = tokens = flops = 0
    anon_peak = rss_mb()[0]
    start, cpu0 = time.perf_counter(), time.process_time()
    while rows < args.read:
        batches, (real_tokens, step_flops) = feeder.next_step()
        rows += per_step
        tokens += real_tokens
        flops += step_flops
        tiles += sum(int(mb.tiles.shape[0]) for mb in batches) if images else 0
        anon_peak = max(anon_peak, rss_mb()[0])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    feeder.close()
    anon, file_backed = rss_mb()
    return {
        "open_s": open_s,
        "rows": rows,
        "wall": wall,
        "cpu": cpu,
        "tiles": tiles,
        "tokens": tokens,
        "flops": flops,
        "anon_peak": anon_peak,
        "file_mb": file_backed,
    }


class _Lengths:
    """Stands in for a PackedDataset where only its length matters (--locate-only)."""

    seq_length = 0
    tokenizer_meta = None

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def locate_only(args: argparse.Namespace) -> int:
    """The index arithmetic alone: stream rows located per second (issue 15's table)."""
    import megatron_sail.data.loading.dataset as dataset_module

    real = dataset_module.PackedDataset
    dataset_module.PackedDataset = lambda prefix, verify="cheap": _Lengths(args.rows)
    try:
        blend = dataset_module.BlendedDataset(
            [f"src{d}" for d in range(args.datasets)], [1.0] * args.datasets, seed=1234
        )
    finally:
        dataset_module.PackedDataset = real
    start, cpu0 = time.perf_counter(), time.process_time()
    for k in range(args.read):
        blend.locate(k)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    print(
        f"datasets={args.datasets} rows_each={args.rows} located={args.read} seconds={wall:.2f} "
        f"rows_per_cpu_s={args.read / cpu:.1f}"
    )
    print(
        f"rows_per_s={args.read / wall:.1f} "
        f"peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
    )
    return 0
