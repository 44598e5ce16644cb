"""What a scoring rule returns."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BenchmarkScore:
    """One benchmark's score on the OpenCompass scale, plus the rule's sub-scores."""

    score: float
    """Headline number (percent, OCRBench count or MME points; see ``metric``)."""
    n: int
    """Items scored."""
    metric: str
    """What ``score`` is, in words."""
    details: dict = field(default_factory=dict)
    """Sub-scores (per category, precision/recall, perception/cognition, ...)."""
