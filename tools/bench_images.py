"""Measure an image backend: decode and tile every image in a folder repeatedly.

    python tools/bench_images.py --images /tmp/photos --backend dali-cpu --threads 2 [--generate 30]

Prints `images_per_s=<float> tiles_per_s=<float>` as its last line; the line before it adds the
process CPU time (images_per_cpu_s), which shared machines distort less than wall time. ``--generate N`` first fills
an empty folder with N photo-like 1024x768 JPEGs (megatron_sail.data.images.synthetic).
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import torch

from megatron_sail import cli
from megatron_sail.config.images import ImageConfig, TilingConfig
from megatron_sail.data.images import build_image_pipeline
from megatron_sail.data.images.files import load_record
from megatron_sail.data.images.synthetic import synthetic_jpeg

EXTENSIONS = ("*.jpg", "*.jpeg", "*.png", "*.JPG", "*.JPEG", "*.PNG")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="folder of JPEG/PNG files")
    p.add_argument(
        "--backend",
        required=True,
        choices=["pil", "dali-cpu", "dali", "auto"],
        help="image decoder to time: pil, dali-cpu, dali (GPU) or auto",
    )
    p.add_argument("--threads", type=int, default=2, help="decode threads (torch CPU threads are set equal)")
    p.add_argument(
        "--max-tiles", type=int, default=12, metavar="N", help="most tiles per image (default: %(default)s)"
    )
    p.add_argument(
        "--tile-size", type=int, default=448, metavar="PX", help="tile side in pixels (default: %(default)s)"
    )
    p.add_argument("--batch", type=int, default=8, help="images per pipeline call (about one micro-batch)")
    p.add_argument("--seconds", type=float, default=10.0, help="minimum measured time (at least one pass)")
    p.add_argument(
        "--generate", type=int, default=0, help="write this many 1024x768 JPEGs first if DIR is empty"
    )
    return p.parse_args(argv)


def generate(folder: str, count: int) -> None:
    """Fill ``folder`` with photo-like JPEGs, each written under a temporary name then renamed."""
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        path = os.path.join(folder, f"synthetic_{i:03d}.jpg")
        with open(path + ".tmp", "wb") as f:
            f.write(synthetic_jpeg(1024, 768, seed=i))
        os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = sorted(f for pattern in EXTENSIONS for f in glob.glob(os.path.join(args.images, pattern)))
    if not files and args.generate:
        generate(args.images, args.generate)
        files = sorted(glob.glob(os.path.join(args.images, "*.jpg")))
    if not files:
        raise SystemExit(f"{args.images}: no .jpg/.jpeg/.png images (use --generate N to make some)")
    torch.set_num_threads(args.threads)
    tiling = TilingConfig(tile_size=args.tile_size, max_tiles=args.max_tiles)
    records = [load_record(f, tiling) for f in files]
    batches = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    pipe = build_image_pipeline(
        ImageConfig(
            backend=args.backend, tile_size=args.tile_size, threads=args.threads, max_batch_images=args.batch
        )
    )
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    pipe.tiles(batches[0])  # warm-up: pipeline build, allocator, thread start
    sync()
    images = tiles = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for k in range(10**9):
        out, _ = pipe.tiles(batches[k % len(batches)])
        images, tiles = images + len(batches[k % len(batches)]), tiles + out.shape[0]
        if k + 1 >= len(batches) and time.perf_counter() - start >= args.seconds:
            break
    sync()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(
        f"backend={pipe.backend} threads={args.threads} files={len(files)} batch={args.batch} "
        f"images={images} tiles={tiles} seconds={elapsed:.2f} cpu_seconds={cpu:.2f} "
        f"images_per_cpu_s={images / cpu:.2f} failures={pipe.failures}"
    )
    print(f"images_per_s={images / elapsed:.2f} tiles_per_s={tiles / elapsed:.2f}")
    pipe.close()
    return 0


if __name__ == "__main__":
    cli.run(main)
