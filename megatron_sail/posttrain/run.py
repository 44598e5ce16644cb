"""Stages dpo and grpo: the common start (stage.py), then the stage's per-step function in the
common loop. Called by ``python -m megatron_sail.train --stage dpo|grpo``."""

from __future__ import annotations

from megatron_sail.config.run import RunConfig
from megatron_sail.posttrain.dpo import dpo_stepper
from megatron_sail.posttrain.grpo import grpo_stepper
from megatron_sail.posttrain.stage import run_loop, setup


def train_posttrain(cfg: RunConfig) -> int:
    """Run stage dpo or grpo; returns the exit code."""
    s = setup(cfg)
    try:
        if cfg.stage.name == "dpo":
            return run_loop(s, dpo_stepper(s))
        return run_loop(s, grpo_stepper(s))
    finally:
        s.metrics.close()
