"""What a scoring rule returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BenchmarkScore:
    """One benchmark's score on the OpenCompass scale, plus the rule's sub-scores."""

    score: float
    """Headline number (percent, OCRBench count or MME points; see ``metric``), the number
    VLMEvalKit reports as the benchmark's result."""
    n: int
    """Items scored."""
    metric: str
    """What ``score`` is, in words."""
    details: dict = field(default_factory=dict)
    """Sub-scores (per category or split, precision/recall, perception/cognition, ...)."""
    bad_items: list = field(default_factory=list)
    """Items that could not be scored as intended, each {"index", "reason"}: scored as VLMEvalKit
    scores them (usually wrong) and listed here instead of stopping the benchmark."""
    per_item: dict = field(default_factory=dict)
    """index -> the item's verdict (1/0, an ANLS value, ...; for circular MMBench one entry
    per question, under its main row's index). Not written to results.json."""


def bad_item(index: str, reason: str) -> dict:
    """One entry of BenchmarkScore.bad_items."""
    return {"index": str(index), "reason": reason}
