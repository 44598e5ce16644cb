"""RunConfig: one run's full configuration, one typed part per component (config/run.py
resolves it from a recipe, YAML and flags; config/recipes.py builds the recipes' defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_sail.config.eval import BenchmarkEvalConfig
from megatron_sail.config.images import ImageConfig
from megatron_sail.config.model import ModelConfig
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.config.posttrain import PostTrainConfig
from megatron_sail.config.stage import StageConfig
from megatron_sail.config.train import CheckpointConfig, DataConfig, OptimConfig, TrainConfig


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs; each part belongs to one component. Frozen: a step
    that changes a part (the data's vocabulary, say) makes a new RunConfig."""

    recipe: str
    """Recipe name this run started from (tiny, sail_2b, sail_8b)."""
    stage: StageConfig
    """Training stage: trainable modules and schedule defaults."""
    model: ModelConfig
    """ViT, projector and LM shapes."""
    parallel: ParallelConfig
    """TP / PP / VPP / SP / EP sizes."""
    images: ImageConfig
    """Image pipeline (tile size, decoder)."""
    data: DataConfig
    """Dataset prefixes and row length."""
    optim: OptimConfig
    """Optimizer and LR schedule."""
    train: TrainConfig
    """Loop settings."""
    checkpoint: CheckpointConfig
    """Save / load / init-from."""
    eval: BenchmarkEvalConfig = dataclasses.field(default_factory=BenchmarkEvalConfig)
    """Benchmarks scored on the live model during training (--eval-benchmark)."""
    post: PostTrainConfig = dataclasses.field(default_factory=PostTrainConfig)
    """Stages dpo and grpo: losses, reference, rollouts, rewards (config/posttrain.py)."""
