"""The five SAIL-VL training stages and their per-stage defaults.

What SAIL-VL published (see /work/shared/SAIL-VL.md): which modules train in each stage and the
token / sample budgets. What it did NOT publish: learning rates, warmup and schedules. Those
defaults below are OUR ASSUMPTIONS, taken from the nearest public references with the same ViT:
InternVL2.5 (MLP alone at 2e-4, full model at 4e-5) and SAIL-VL2 (2e-4 adapter, 2e-5 ViT +
adapter, 1e-5 all). Every field can be overridden from YAML or the command line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StageConfig:
    """Which modules train in a stage and the stage's default optimizer schedule."""

    name: str
    """Stage name as given to --stage."""
    train_vision: bool
    """Whether the ViT is trainable."""
    train_projector: bool
    """Whether the projector (pixel-shuffle MLP) is trainable."""
    train_language: bool
    """Whether the language model is trainable."""
    lr: float
    """Default peak LR (assumption, see module docstring)."""
    min_lr: float
    """Default final LR (assumption)."""
    warmup_fraction: float
    """Default warmup as a fraction of train_iters (assumption)."""
    lr_decay_style: str
    """Default schedule: cosine or WSD (assumption)."""
    weight_decay: float
    """Default weight decay (assumption)."""


STAGES: dict[str, StageConfig] = {
    # Published: projector only. LR 2e-4 follows InternVL2.5 / SAIL-VL2 adapter training.
    "pretrain-alignment": StageConfig(
        "pretrain-alignment",
        False,
        True,
        False,
        lr=2e-4,
        min_lr=2e-5,
        warmup_fraction=0.03,
        lr_decay_style="cosine",
        weight_decay=0.0,
    ),
    # Published: ViT + projector (LLM "reported frozen, not certain" -> --train-language turns it
    # on). LR 2e-5 follows SAIL-VL2's ViT + adapter stage; WSD because the 524B-token stage is long
    # and is usually extended (assumption).
    "pretrain-advance": StageConfig(
        "pretrain-advance",
        True,
        True,
        False,
        lr=2e-5,
        min_lr=2e-6,
        warmup_fraction=0.01,
        lr_decay_style="WSD",
        weight_decay=0.05,
    ),
    # Published: all trainable, a three-stage curriculum. LR 1e-5 (SAIL-VL2 "all") for knowledge,
    # then lower for later stages that start from the previous stage's weights (assumption).
    "sft-knowledge": StageConfig(
        "sft-knowledge",
        True,
        True,
        True,
        lr=1e-5,
        min_lr=1e-6,
        warmup_fraction=0.03,
        lr_decay_style="cosine",
        weight_decay=0.05,
    ),
    "sft-instruction": StageConfig(
        "sft-instruction",
        True,
        True,
        True,
        lr=1e-5,
        min_lr=1e-6,
        warmup_fraction=0.03,
        lr_decay_style="cosine",
        weight_decay=0.05,
    ),
    "sft-preference": StageConfig(
        "sft-preference",
        True,
        True,
        True,
        lr=5e-6,
        min_lr=5e-7,
        warmup_fraction=0.03,
        lr_decay_style="cosine",
        weight_decay=0.05,
    ),
    # Post-training (posttrain/). DPO/MPO: InternVL's MPO scripts (5e-6, cosine,
    # warmup 0.03, weight decay 0.05). GRPO: 1e-6 constant, no weight decay, as verl's and
    # ms-swift's GRPO examples (assumption: SAIL-VL2 publishes no RL hyper-parameters).
    "dpo": StageConfig(
        "dpo",
        True,
        True,
        True,
        lr=5e-6,
        min_lr=5e-7,
        warmup_fraction=0.03,
        lr_decay_style="cosine",
        weight_decay=0.05,
    ),
    "grpo": StageConfig(
        "grpo",
        False,
        True,
        True,
        lr=1e-6,
        min_lr=1e-6,
        warmup_fraction=0.0,
        lr_decay_style="constant",
        weight_decay=0.0,
    ),
}

POST_TRAINING = ("dpo", "grpo")
"""Stages that read JSONL/TSV at start-up and run posttrain/'s loop."""


def get_stage(name: str) -> StageConfig:
    """Look a stage up by name, with a clear error listing the valid ones."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
    return STAGES[name]
