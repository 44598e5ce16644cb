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
from PIL import Image, UnidentifiedImageError

from megatron_sail.config.images import ImageConfig, TilingConfig
from megatron_sail.data.images import build_image_pipeline
from megatron_sail.data.records import ImageRecord
from megatron_sail.data.tiling import find_grid
from megatron_sail import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=["pil", "dali-cpu", "dali", "auto"],
                   help="image decoder whose tiles are written: pil, dali-cpu, dali (GPU) or auto")
    p.add_argument("--image", required=True, help="JPEG or PNG file")
    p.add_argument("--max-tiles", type=int, default=12, help="most grid tiles (thumbnail not counted)")
    p.add_argument("--tile-size", type=int, default=448, metavar="PX",
                   help="tile side in pixels (default: %(default)s)")
    p.add_argument("--out", required=True, help="output .npy path")
    return p.parse_args(argv)


def load_record(path: str, tiling: TilingConfig) -> ImageRecord:
    """Read the file and pick its grid from the header's size; a non-image file is a clear error."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as e:
        raise SystemExit(f"{path}: not a readable image ({e})")
    grid = find_grid(width, height, tiling)
    return ImageRecord(data=data, grid=grid, thumbnail=tiling.thumbnail, size=(width, height),
                       sample=0, source=f"{path}:0")


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
    print(f"{args.out}: {tiles.shape[0]} tiles of {args.tile_size}px, grid {rec.grid[0]}x{rec.grid[1]} "
          f"(cols x rows), image {rec.size[0]}x{rec.size[1]}, backend {pipe.backend}")
    pipe.close()
    return 0


if __name__ == "__main__":
    cli.run(main)
