"""SigLIP's encoder is a configuration of the one ViTEncoder (models/vit.py): its parts and
layer settings are ``SigLIPFamily.encoder`` in models/families/siglip.py. ``SigLIPEncoder``
builds that configuration whatever ``VisionConfig.family`` says."""

from __future__ import annotations

import torch

from megatron_sail.config.model import VisionConfig
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.models.vit import ViTEncoder


def SigLIPEncoder(
    vision: VisionConfig,
    parallel: ParallelConfig,  # noqa: N802 - a builder
    dtype: torch.dtype = torch.float32,
    use_te: bool = False,
) -> ViTEncoder:
    """The SigLIP-configured ViTEncoder (refuses VisionConfig fields SigLIP has no place for)."""
    return ViTEncoder(vision, parallel, dtype, use_te, family="siglip")
