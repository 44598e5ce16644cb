"""Activation recompute (--recompute-granularity selective|full for the LM, --recompute-vit).

Megatron-Core implements both kinds; they are switched on through the TransformerConfig of
each transformer: ``full`` makes the TransformerBlock checkpoint every layer (uniform method,
one layer per chunk: only layer inputs stay in memory), ``selective`` checkpoints the core
attention (Megatron's default ``recompute_modules=["core_attn"]``: the attention scores, the
biggest activations that are cheap to recompute). The ViT and the LM have separate configs, so
they are set separately. The models are built first and recompute is applied afterwards: the
block reads ``recompute_granularity`` at every forward, but each attention module copies
``checkpoint_core_attention`` from the config when it is built, so that flag is set here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sail.models.sail_vl import unwrap


@dataclass
class RecomputeConfig:
    """Which activations are recomputed in the backward pass instead of being kept."""

    language: Optional[str] = None
    """LM decoder: None, "selective" (core attention) or "full" (whole layers)."""
    vision: bool = False
    """Full recompute of the ViT layers (many tiles per row make its activations large)."""
    method: Optional[str] = None
    """LM full recompute: uniform (groups of ``num_layers`` layers) or block (the first
    ``num_layers`` layers of each pipeline stage), Megatron-Core's two methods; None: uniform."""
    num_layers: Optional[int] = None
    """Layers per uniform group / checkpointed layers per stage for block; None: 1."""


def _set_full(config, method: Optional[str] = None, num_layers: Optional[int] = None) -> None:
    """Full recompute in the blocks built with this TransformerConfig (default: every layer
    its own checkpoint)."""
    config.recompute_granularity = "full"
    config.recompute_method = method or "uniform"
    config.recompute_num_layers = num_layers or 1


def _set_selective(config, module: torch.nn.Module) -> None:
    """Checkpoint the core attention of every attention layer under ``module``."""
    config.recompute_granularity = "selective"
    config.recompute_modules = ["core_attn"]
    for sub in module.modules():
        if hasattr(sub, "checkpoint_core_attention"):
            sub.checkpoint_core_attention = True


def apply_recompute(chunk: torch.nn.Module, cfg: RecomputeConfig) -> None:
    """Switch recompute on in one (possibly DDP-wrapped) SailVLModel chunk."""
    model = unwrap(chunk)
    if cfg.language not in (None, "selective", "full"):
        raise ValueError(f"--recompute-granularity {cfg.language!r}: expected selective or full")
    lm = model.language_model
    if cfg.language == "full":
        _set_full(lm.config, cfg.method, cfg.num_layers)
    elif cfg.language == "selective":
        _set_selective(lm.config, lm)
    if cfg.vision and getattr(model, "vision_model", None) is not None:
        _set_full(model.vision_model.config)
