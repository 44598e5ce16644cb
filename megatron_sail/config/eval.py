"""Config of the in-training benchmark evaluation (megatron_sail/eval/hook.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class BenchmarkEvalConfig:
    """Benchmarks scored on the live model during training (--eval-benchmark ...)."""

    benchmarks: list[str] = field(default_factory=list)
    """NAME=PATH entries (VLMEvalKit TSVs; NAME as in tools/evaluate.py); empty: off."""
    interval: int = 0
    """Evaluate every this many steps (0: only at the end of the run)."""
    at_iterations: list[int] = field(default_factory=list)
    """Also evaluate after exactly these steps (--eval-benchmark-at 8 16 32 ...): the
    geometrically spaced token counts a scaling fit wants, from one run."""
    limit: Optional[int] = None
    """Only the first N items of each file (None: all)."""
    max_new_tokens: Optional[int] = None
    """Answer budget (None: the benchmark's own, 16-128 tokens)."""
    batch_size: int = 8
    """Prompts decoded together."""
