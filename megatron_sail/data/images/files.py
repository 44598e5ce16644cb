"""One image file as an ImageRecord, its tile grid chosen from its size as preprocessing does
(tools/render_tiles.py, tools/gpu_check.py's DALI parity)."""

from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from megatron_sail.config.images import TilingConfig
from megatron_sail.data.records import ImageRecord
from megatron_sail.data.tiling import find_grid


def load_record(path: str, tiling: TilingConfig) -> ImageRecord:
    """Read the file and pick its grid from the header's size; a non-image file is a clear error."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as e:
        raise SystemExit(f"{path}: not a readable image ({e})") from e
    grid = find_grid(width, height, tiling)
    return ImageRecord(
        data=data, grid=grid, thumbnail=tiling.thumbnail, size=(width, height), sample=0, source=f"{path}:0"
    )
