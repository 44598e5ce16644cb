"""Configuration of the image pipeline: how images are cut into tiles (TilingConfig, used offline
by preprocessing and online by generation) and how stored bytes become tiles (ImageConfig:
decoding, normalization, prefetch)."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "pil", "dali-cpu", "dali")
"""Accepted values of ImageConfig.backend."""
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
"""Largest width x height accepted, at preprocessing (``--max-image-pixels``) and at train time
(``ImageConfig.max_pixels``): a 48 MP phone photo passes; a 12000x12000 scan (144 MP; its decode
cost is in docs/performance.md) does not. The tiler never uses more than max_tiles x 448^2 pixels."""


@dataclass(frozen=True)
class TilingConfig:
    """How images are cut into tiles (SAIL-VL defaults)."""

    tile_size: int = 448
    """Side of one square tile in pixels (the ViT's input size)."""
    min_tiles: int = 1
    """Fewest tiles in the grid (thumbnail not counted)."""
    max_tiles: int = 12
    """Most tiles in the grid (thumbnail not counted)."""
    thumbnail: bool = True
    """Append a whole-image thumbnail tile when the grid has more than one tile."""
    tokens_per_tile: int = 256
    """Visual tokens one tile becomes after pixel shuffle (256 for 448px, ratio 0.5, patch 14)."""


@dataclass
class ImageConfig:
    """How stored image bytes become the normalized tiles the vision encoder reads."""

    backend: str = "auto"
    """'dali' (GPU decode + resize), 'dali-cpu', 'pil' (InternVL reference), or 'auto': 'dali'
    with CUDA, 'dali-cpu' without, 'pil' when DALI is not importable."""
    tile_size: int = 448
    """Side of one square tile in pixels; must equal the tile size used at preprocessing."""
    threads: int = 2
    """CPU worker threads for decoding and resizing (PIL pool size or DALI num_threads)."""
    max_batch_images: int = 32
    """Most images one DALI pipeline run takes; larger requests run in several chunks."""
    device_id: int | None = None
    """CUDA device for the 'dali' backend; None means torch.cuda.current_device()."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean subtracted after scaling pixels to [0, 1] (ImageNet, as InternVL)."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel standard deviation divided out after the mean (ImageNet, as InternVL)."""
    prefetch_depth: int = 2
    """Micro-batches the background loader keeps ready ahead of the training step."""
    pin_memory: bool = False
    """Pin CPU tile tensors so the trainer can copy them to the GPU asynchronously."""
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Images whose header claims more pixels are not decoded (blank tiles, loss masked), the
    limit preprocessing applied (``--max-image-pixels``): no decode can stall the loader."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"ImageConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.tile_size <= 0 or self.threads <= 0 or self.max_batch_images <= 0:
            raise ValueError(
                "ImageConfig.tile_size, threads and max_batch_images must be positive, got "
                f"{self.tile_size}, {self.threads}, {self.max_batch_images}"
            )
        if self.max_pixels <= 0:
            raise ValueError(f"ImageConfig.max_pixels must be positive, got {self.max_pixels}")
        if self.prefetch_depth < 1:
            raise ValueError(f"ImageConfig.prefetch_depth must be >= 1, got {self.prefetch_depth}")
