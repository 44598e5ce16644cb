"""Write the normalized tiles of one image as a float32 .npy array [n, 3, S, S] (thumbnail last).

    python tools/render_tiles.py --backend dali-cpu --image photo.jpg --out tiles.npy

The grid is chosen with InternVL's rule (megatron_sail.data.tiling.find_grid) from the image
size, exactly as preprocessing stores it; compare the outputs of two backends to see how close
they are.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from megatron_sail import cli
from megatron_sail.config.images import ImageConfig, TilingConfig
from megatron_sail.data.images import build_image_pipeline
from megatron_sail.data.images.files import load_record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--backend",
        required=True,
        choices=["pil", "dali-cpu", "dali", "auto"],
        help="image decoder whose tiles are written: pil, dali-cpu, dali (GPU) or auto",
    )
    p.add_argument("--image", required=True, help="JPEG or PNG file")
    p.add_argument("--max-tiles", type=int, default=12, help="most grid tiles (thumbnail not counted)")
    p.add_argument(
        "--tile-size", type=int, default=448, metavar="PX", help="tile side in pixels (default: %(default)s)"
    )
    p.add_argument("--out", required=True, help="output .npy path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rec = load_record(args.image, TilingConfig(tile_size=args.tile_size, max_tiles=args.max_tiles))
    pipe = build_image_pipeline(ImageConfig(backend=args.backend, tile_size=args.tile_size))
    tiles, ok = pipe.tiles([rec])
    if not ok[0]:
        raise SystemExit(f"{args.image}: failed to decode with backend {pipe.backend}")
    tmp = f"{args.out}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, tiles.cpu().numpy())
    os.replace(tmp, args.out)
    print(
        f"{args.out}: {tiles.shape[0]} tiles of {args.tile_size}px, grid {rec.grid[0]}x{rec.grid[1]} "
        f"(cols x rows), image {rec.size[0]}x{rec.size[1]}, backend {pipe.backend}"
    )
    pipe.close()
    return 0


if __name__ == "__main__":
    cli.run(main)
