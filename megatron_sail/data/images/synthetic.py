"""Photo-like synthetic images for tests and benchmarks (no image files are shipped).

Smooth gradients, soft blobs, hard-edged patches and sensor-like noise: JPEG sizes and decode costs close
to real photos, and enough high-frequency content that resize filters actually differ.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def synthetic_photo(width: int, height: int, seed: int) -> np.ndarray:
    """An HWC uint8 RGB image, a pure function of (width, height, seed)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, base = rng.uniform(-120, 120, 2), rng.uniform(0, 6.28), rng.uniform(60, 190)
        img[..., c] = base + a[0] * x / width + a[1] * y / height + 25 * np.sin(b + x / (7 + 13 * c))
    for _ in range(4):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-90, 90, 3)
    for _ in range(6):  # hard edges, like object boundaries
        x0, y0 = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        x1, y1 = x0 + int(rng.uniform(0.05, 0.4) * width), y0 + int(rng.uniform(0.05, 0.4) * height)
        img[y0:y1, x0:x1] += rng.uniform(-70, 70, 3)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: np.ndarray, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """Encode an HWC uint8 (or HW / HWA) array as JPEG or PNG bytes."""
    buf = io.BytesIO()
    pil = Image.fromarray(img)
    if fmt == "JPEG":
        pil.save(buf, format=fmt, quality=quality)
    else:
        pil.save(buf, format=fmt)
    return buf.getvalue()


def synthetic_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """JPEG bytes of ``synthetic_photo(width, height, seed)``."""
    return encode(synthetic_photo(width, height, seed), "JPEG", quality)
