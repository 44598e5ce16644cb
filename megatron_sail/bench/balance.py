"""Data-parallel balance of the vision work, behind tools/bench_balance.py.

For each global batch of a blend, the modelled step FLOPs (training/flops.py: ViT + projector +
LM per row) of every data-parallel rank, once with the contiguous split and once with the
balanced assignment the trainer uses (training/balance.py); the straggler factor of a step is
the busiest rank's FLOPs over the mean.

``write_mix`` builds a blend shaped like SAIL-VL's SFT mix when no real one is at hand: a
text-only source (text rows carry no ViT work at all) and a vision source whose images follow
the SAIL-VL tiling (448 px tiles, up to 12 + thumbnail) with a spread of grids from single
tiles to 13-tile photos and documents, one to three images per sample, answers log-normal.
Samples are packed by the real packer into rows and written by the real writer; the image
bytes are one small placeholder JPEG (the balancer reads only each image's grid, never pixels).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from megatron_sail.data import indexed

GRIDS = (
    ((1, 1), 0.25),
    ((2, 1), 0.05),
    ((1, 2), 0.05),
    ((2, 2), 0.15),
    ((3, 2), 0.10),
    ((3, 3), 0.10),
    ((4, 3), 0.15),
    ((3, 4), 0.10),
    ((6, 2), 0.05),
)
"""(cols, rows) tile grid of an image and its share: InternVL's dynamic tiling of typical SFT
images (small crops and icons 1 tile; squares 5 or 10; 4:3 photos and pages 13; wide charts)."""


def _sample(rng: np.random.Generator, images: int, jpeg: bytes):
    """One chat sample with ``images`` images (their grids drawn from GRIDS) and a log-normal
    answer; the tokens are placeholders with the right special ids and lengths."""
    from megatron_sail.bench.data_scale import SPECIAL, VOCAB
    from megatron_sail.data.preprocess.packing import ImageEntry, Sample

    s = SPECIAL
    grids, shares = zip(*GRIDS)
    parts, entries = [[s["im_start_id"]]], []
    for g in rng.choice(len(grids), size=images, p=np.asarray(shares) / sum(shares)):
        cols, rows = grids[g]
        tiles = cols * rows + (cols * rows > 1)
        parts.append([s["img_start_id"], *[s["img_context_id"]] * (tiles * 256), s["img_end_id"]])
        entries.append(ImageEntry(jpeg, (cols, rows), cols * rows > 1, (cols * 448, rows * 448)))
    words = int(min(3000, max(4, rng.lognormal(4.6, 1.0))))
    question = rng.integers(10, VOCAB, size=12, dtype=np.int32)
    answer = rng.integers(10, VOCAB, size=words, dtype=np.int32)
    tokens = np.concatenate([*map(np.asarray, parts), question, answer, [s["im_end_id"]]]).astype(np.int32)
    mask = np.zeros(len(tokens), dtype=np.uint8)
    mask[-words - 1 :] = 1
    return Sample(tokens, mask, entries)


def write_source(prefix: str, rows: int, seq_length: int, seed: int, vision: bool) -> None:
    """About ``rows`` packed rows of one source (text-only, or the vision mix) at ``prefix``."""
    from megatron_sail.bench.data_scale import SPECIAL, meta_for
    from megatron_sail.data.images.synthetic import synthetic_jpeg
    from megatron_sail.data.preprocess.packing import pack_block

    rng = np.random.default_rng(seed)
    jpeg = synthetic_jpeg(64, 48, seed=seed)
    written = block = 0
    with indexed.PackedWriter(prefix) as w:
        while written < rows:
            samples = []
            for _ in range(min(4096, 4 * rows)):
                images = int(rng.choice([1, 1, 1, 1, 1, 1, 2, 2, 3])) if vision else 0
                sample = _sample(rng, images, jpeg)
                if len(sample) <= seq_length:
                    samples.append(sample)
            for row in pack_block(samples, seq_length, seed, block)[: rows - written]:
                w.add_row(row, SPECIAL["img_context_id"])
                written += 1
            w.end_block(block)
            block += 1
        st = w.stats
        meta = meta_for(
            seq_length, written, w.samples, w.num_images, st["tiles"], st["tokens"], st["image_tokens"]
        )
        meta["stats"]["loss_tokens"] = st["loss_tokens"]
        w.commit(meta)


def write_mix(root: str, rows: int, seq_length: int = 4096, text_share: float = 0.2) -> str:
    """The two sources under ``root`` (reused when complete); returns the blend's data path."""
    import os

    os.makedirs(root, exist_ok=True)
    parts = (("text", text_share, False), ("vision", 1 - text_share, True))
    for d, (name, share, vision) in enumerate(parts):
        prefix = os.path.join(root, name)
        if indexed.load_meta(prefix) is None:
            write_source(prefix, max(1, round(rows * share)), seq_length, 1000 + d, vision)
    return " ".join(f"{share} {os.path.join(root, name)}" for name, share, _ in parts)


def measure(data_path: str, dp: int, global_batch_size: int, steps: int, recipe: str) -> dict:
    """Mean over ``steps`` global batches of the straggler factor, contiguous vs balanced."""
    from megatron_sail.config.recipes import model_recipe
    from megatron_sail.data.loading.dataset import build_blended
    from megatron_sail.training import balance
    from megatron_sail.training.flops import shape_from_model_config
    from megatron_sail.training.loop import row_flops

    if global_batch_size % dp:
        raise ValueError(f"--global-batch-size {global_batch_size} is not a multiple of --dp {dp}")
    blend = build_blended(data_path)
    cost = row_flops(
        blend, shape_from_model_config(model_recipe(recipe), blend.datasets[0].meta["tiling"]["tile_size"])
    )
    before, after, seconds = [], [], 0.0
    for step in range(steps):
        costs = [cost(step * global_batch_size + i) for i in range(global_batch_size)]
        t0 = time.perf_counter()
        ranks = balance.assign(costs, dp, global_batch_size // dp)
        seconds += time.perf_counter() - t0
        before.append(balance.straggler(costs, balance.contiguous(global_batch_size, dp)))
        after.append(balance.straggler(costs, ranks))
    return {
        "rows": len(blend),
        "steps": steps,
        "dp": dp,
        "global_batch_size": global_batch_size,
        "worst_before": max(before),
        "worst_after": max(after),
        "assign_ms_per_step": 1000 * seconds / steps,
        "straggler_before": float(np.mean(before)),
        "straggler_after": float(np.mean(after)),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The tool's flags."""
    p.add_argument("--data-path", nargs="+", metavar="BLEND", help="Megatron-style blend ('w1 p1 w2 p2')")
    p.add_argument(
        "--make-mix",
        metavar="DIR",
        help="build (or reuse) the SAIL-VL-shaped demo blend in DIR and measure it when --data-path is absent",
    )
    p.add_argument(
        "--rows", type=int, default=16000, metavar="N", help="--make-mix rows (default: %(default)s)"
    )
    p.add_argument(
        "--dp", type=int, default=8, metavar="N", help="data-parallel ranks (default: %(default)s)"
    )
    p.add_argument(
        "--global-batch-size", type=int, default=256, metavar="N", help="rows per step (default: %(default)s)"
    )
    p.add_argument(
        "--steps", type=int, default=20, metavar="N", help="global batches measured (default: %(default)s)"
    )
    p.add_argument(
        "--recipe",
        default="sail_2b",
        metavar="NAME",
        help="model whose FLOPs are modelled (default: %(default)s)",
    )
