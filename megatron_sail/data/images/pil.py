"""The reference backend: InternVL's own preprocessing with PIL, on a thread pool.

InternVL's load_image + dynamic_preprocess: open, convert to RGB, resize the whole image to
(cols*S, rows*S) with PIL's default (bicubic) filter, crop S x S tiles row-major, and resize the
whole image to S x S for the thumbnail. PIL releases the GIL while decoding and resizing, so a
thread pool scales over cores.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from megatron_sail.config.images import DEFAULT_MAX_IMAGE_PIXELS, ImageConfig
from megatron_sail.data.images.imageinfo import to_8bit
from megatron_sail.data.images.pipeline import ImagePipeline
from megatron_sail.data.records import ImageRecord


def decode_and_resize(
    data: bytes,
    grid: tuple[int, int],
    tile_size: int,
    thumbnail: bool,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode bytes and return the HWC uint8 grid-sized image and, if asked, the thumbnail.

    The size is checked before any pixel is decoded; 16-bit grey is scaled to 8 bits (PIL's
    convert("RGB") would clip it at 255, turning a 16-bit PNG almost white).
    """
    img = Image.open(io.BytesIO(data))
    if img.size[0] * img.size[1] > max_pixels:
        raise ValueError(f"{img.size[0]}x{img.size[1]} pixels > max_pixels {max_pixels}")
    img = to_8bit(img).convert("RGB")
    cols, rows = grid
    resized = np.array(img.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC))
    thumb = np.array(img.resize((tile_size, tile_size), Image.Resampling.BICUBIC)) if thumbnail else None
    return resized, thumb


class PilPipeline(ImagePipeline):
    """PIL decoding and bicubic resizing, one image per pool task."""

    backend = "pil"

    def __init__(self, cfg: ImageConfig) -> None:
        super().__init__(cfg)
        self._pool = (
            ThreadPoolExecutor(cfg.threads, thread_name_prefix="pil-tiles") if cfg.threads > 1 else None
        )

    def _decode_into(self, records: Sequence[ImageRecord], outs: list[torch.Tensor]) -> list[str | None]:
        """Process every image independently; the pool keeps the result order."""
        if self._pool is None:
            return [self._one(rec, out) for rec, out in zip(records, outs)]
        return list(self._pool.map(self._one, records, outs))

    def _one(self, rec: ImageRecord, out: torch.Tensor) -> str | None:
        """Tile one image into ``out``; a decode error is returned as text, not raised."""
        try:
            grid, thumb = decode_and_resize(
                rec.data, rec.grid, self.cfg.tile_size, self.needs_thumbnail(rec), self.cfg.max_pixels
            )
        except Exception as e:  # any decoder error is a data error: the caller blanks the image
            return f"{type(e).__name__}: {e}"
        self.write_tiles(out, torch.from_numpy(grid), None if thumb is None else torch.from_numpy(thumb), rec)
        return None

    def close(self) -> None:
        """Stop the worker threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
