#!/usr/bin/env python
"""How the data path's cost grows with the work: blends of many sources and long sources.

  python tools/bench_data_scale.py --datasets 64 --rows 1000000 [--seq-length 64]
  python tools/bench_data_scale.py --datasets 4 --rows 64 --seq-length 16384 \
      --images-per-row 4 --backend pil          # SAIL-VL-shaped rows, images decoded
  python tools/bench_data_scale.py --datasets 1000 --rows 100000000 --locate-only --read 200000

Builds N real packed datasets of R rows each under --workdir (written directly with numpy in
Megatron-Core's .bin/.idx layout, a few seconds per 10M rows; with --images-per-row, through
the real PackedWriter, rows of 16,384 tokens holding 1024x768 JPEGs of 13 tiles each), blends
them with equal weights, and reads the blend in training order exactly as the trainer does
(training/loop.StepFeeder: BatchPlan indices of DP rank 0 -> BlendedDataset rows -> the
PrefetchLoader thread -> collate_rows, images decoded by --backend when rows have images).
Datasets are built in a forked child process (before torch is imported), so the reader's
peak RSS is its own. The line before the last gives details (CPU time per row, resident memory
split into anonymous and file-backed pages, and for image rows the loader cores one GPU needs);
the last line is ``rows_per_s=X peak_rss_mb=Y``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from megatron_sail import cli
from megatron_sail.bench.data_scale import GPU_FLOPS, GPU_TOKENS_PER_S, build_all, locate_only, read_blend


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", type=int, required=True, help="sources in the blend")
    p.add_argument("--rows", type=int, required=True, help="rows per source")
    p.add_argument("--seq-length", type=int, default=64, help="tokens per packed row")
    p.add_argument("--tokens-per-row", type=int, default=4, help="stored tokens per text row")
    p.add_argument(
        "--images-per-row",
        type=int,
        default=0,
        help="SAIL-VL-shaped rows: this many 13-tile images per row (0: text rows)",
    )
    p.add_argument(
        "--backend",
        default="pil",
        choices=["pil", "dali-cpu", "dali"],
        help="image decoder for rows with images",
    )
    p.add_argument("--threads", type=int, default=1, help="image decode threads")
    p.add_argument("--read", type=int, default=20000, help="rows to read (timed)")
    p.add_argument(
        "--global-batch-size",
        type=int,
        default=512,
        metavar="N",
        help="rows per optimizer step the loader serves (default: %(default)s)",
    )
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=1,
        metavar="N",
        help="rows per forward pass (default: %(default)s)",
    )
    p.add_argument("--dp-size", type=int, default=1, help="data-parallel ranks (DP rank 0 is read)")
    p.add_argument("--workdir", default=None, help="where the datasets go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the datasets (reused if present)")
    p.add_argument(
        "--verify",
        default="cheap",
        choices=["cheap", "structure", "full"],
        help="load-time check level of every source (open_s measures it)",
    )
    p.add_argument(
        "--locate-only",
        action="store_true",
        help="time BlendedDataset.locate alone over length-only stand-ins (no files)",
    )
    a = p.parse_args(argv)
    if min(a.datasets, a.rows, a.seq_length, a.tokens_per_row, a.read) <= 0 or a.images_per_row < 0:
        p.error("--datasets, --rows, --seq-length, --tokens-per-row and --read must be positive")
    if not a.images_per_row and a.tokens_per_row > a.seq_length:
        p.error("--tokens-per-row must be <= --seq-length")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.locate_only:
        return locate_only(args)
    root = args.workdir or tempfile.mkdtemp(prefix="bench_data_scale_")
    kind = f"img{args.images_per_row}" if args.images_per_row else f"t{args.tokens_per_row}"
    data_dir = os.path.join(root, f"r{args.rows}_s{args.seq_length}_{kind}")
    os.makedirs(data_dir, exist_ok=True)
    prefixes = [os.path.join(data_dir, f"src{d:04d}") for d in range(args.datasets)]
    try:
        t0 = time.perf_counter()
        child = mp.get_context("fork").Process(target=build_all, args=(args, prefixes))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"building the datasets failed (exit {child.exitcode})")
        build_s = time.perf_counter() - t0
        r = read_blend(args, prefixes)
    finally:
        if not args.keep:
            shutil.rmtree(data_dir if args.workdir else root, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows_per_s = r["rows"] / r["wall"]
    line = (
        f"datasets={args.datasets} rows_each={args.rows} seq_length={args.seq_length} "
        f"build_s={build_s:.1f} open_s={r['open_s']:.2f} rows_read={r['rows']} seconds={r['wall']:.2f} "
        f"cpu_ms_per_row={1000 * r['cpu'] / r['rows']:.3f} rows_per_cpu_s={r['rows'] / r['cpu']:.1f} "
        f"rss_anon_peak_mb={r['anon_peak']:.0f} rss_file_mb={r['file_mb']:.0f}"
    )
    if args.images_per_row:
        by_tokens = GPU_TOKENS_PER_S / (r["tokens"] / r["rows"])
        by_flops = GPU_FLOPS / (r["flops"] / r["rows"])
        line += (
            f" backend={args.backend} threads={args.threads} tiles_per_row={r['tiles'] / r['rows']:.1f} "
            f"tiles_per_s={r['tiles'] / r['wall']:.1f} tiles_per_cpu_s={r['tiles'] / r['cpu']:.1f} "
            f"gpu_rows_per_s_by_tokens={by_tokens:.2f} gpu_rows_per_s_by_flops={by_flops:.2f} "
            f"loader_cores_per_gpu={max(by_tokens, by_flops) * r['cpu'] / r['rows']:.2f}"
        )
    print(line)
    print(f"rows_per_s={rows_per_s:.1f} peak_rss_mb={peak:.0f}")
    return 0


if __name__ == "__main__":
    cli.run(main)
