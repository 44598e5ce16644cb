"""Image checks: decodable, smallest side, aspect ratio."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Optional

from PIL import Image

from megatron_sail.config.images import DEFAULT_MAX_IMAGE_PIXELS
from megatron_sail.curate.filters.base import FilterSample, FilterStage, Reject


@dataclass
class ImageCheckConfig:
    """Which images are usable for training."""

    enabled: bool = True
    """Run this stage."""
    min_side: int = 32
    """Smallest allowed width or height in pixels (tiny images carry no detail)."""
    max_aspect_ratio: float = 4.0
    """Largest allowed long side / short side (banners and strips tile badly)."""
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Larger images are rejected as ``too_large`` before decoding (decompression bombs)."""


class ImageCheck(FilterStage):
    """Decodes each image once (later stages reuse it) and checks its geometry."""

    name = "image"

    def __init__(self, cfg: ImageCheckConfig):
        self.cfg = cfg

    def process(self, sample: FilterSample) -> Optional[Reject]:
        if sample.image_bytes is None:
            return Reject("no_image", "no image member (jpg/png/webp/...)")
        try:
            with Image.open(io.BytesIO(sample.image_bytes)) as probe:
                w, h = probe.size
            if w * h > self.cfg.max_pixels:
                return Reject("too_large", f"{w}x{h} pixels > max_pixels {self.cfg.max_pixels}")
            img = sample.image()
        except Exception as e:  # PIL raises many types for corrupt data
            # no object addresses in the detail: rejects files are reproducible byte for byte
            return Reject("undecodable", re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}")[:200])
        w, h = img.size
        if min(w, h) < self.cfg.min_side:
            return Reject("too_small", f"{w}x{h} < min_side {self.cfg.min_side}")
        ratio = max(w, h) / max(1, min(w, h))
        sample.scores["aspect_ratio"] = ratio
        if ratio > self.cfg.max_aspect_ratio:
            return Reject("aspect_ratio", f"{w}x{h}: ratio {ratio:.2f} > {self.cfg.max_aspect_ratio}")
        return None
