"""The choice of image backend: PIL, DALI on CPU or DALI on GPU, by name or automatically.

Apart from the interface (pipeline.py), which every backend implements, so that the backends
import the interface and this module imports the backends, never the other way round.
"""

from __future__ import annotations

import torch

from megatron_sail.config.images import ImageConfig
from megatron_sail.data.images.pil import PilPipeline
from megatron_sail.data.images.pipeline import ImagePipeline


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported here (an installed but broken DALI counts as absent)."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):  # OSError: a shared library of the wheel fails to load
        return False
    return True


def resolve_backend(name: str) -> str:
    """Map 'auto' to 'dali' (CUDA), 'dali-cpu' (no CUDA) or 'pil' (no DALI); keep other names."""
    if name != "auto":
        return name
    if not dali_available():
        return "pil"
    return "dali" if torch.cuda.is_available() else "dali-cpu"


def build_image_pipeline(cfg: ImageConfig) -> ImagePipeline:
    """Build the backend that ``cfg.backend`` names (or the default one for 'auto')."""
    backend = resolve_backend(cfg.backend)
    if backend == "pil":
        return PilPipeline(cfg)
    from megatron_sail.data.images.dali import DaliPipeline  # DALI's module only where it is chosen

    return DaliPipeline(cfg, gpu=backend == "dali")
