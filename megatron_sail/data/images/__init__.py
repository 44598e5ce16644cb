"""Image pipeline: stored image bytes -> normalized tiles, with PIL, DALI-CPU and DALI-GPU backends."""

from megatron_sail.data.images.backend import build_image_pipeline, dali_available, resolve_backend
from megatron_sail.data.images.pipeline import ImagePipeline

__all__ = ["ImagePipeline", "build_image_pipeline", "dali_available", "resolve_backend"]
