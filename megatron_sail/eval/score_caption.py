"""Caption scoring by word overlap: per item, the F1 of the prediction's words against the
best-matching reference (a bag-of-words measure in the spirit of CIDEr/ROUGE-1, no external
scorer needed); the benchmark score is the mean over items, in percent."""

from __future__ import annotations

import re
from collections import Counter

from megatron_sail.eval.result import BenchmarkScore
from megatron_sail.eval.score_vqa import answers_of

_WORD = re.compile(r"[a-z0-9]+")


def caption_words(text: str) -> list[str]:
    """Lower-cased alphanumeric words; punctuation and case do not count."""
    return _WORD.findall(text.lower())


def word_f1(reference: str, prediction: str) -> float:
    """Harmonic mean of word precision and recall (multiset overlap), in [0, 1]."""
    ref, pred = Counter(caption_words(reference)), Counter(caption_words(prediction))
    common = sum((ref & pred).values())
    if not common:
        return 0.0
    p, r = common / sum(pred.values()), common / sum(ref.values())
    return 2 * p * r / (p + r)


def item_caption_f1(item, prediction: str) -> float:
    """Best word F1 over the item's references (``answer``: one caption or a list literal)."""
    return max(word_f1(g, prediction) for g in answers_of(item))


def score_caption(items, predictions: dict) -> BenchmarkScore:
    """Mean word F1 (%) and the exact-match share (after normalising words)."""
    f1s, exact = [], 0
    for it in items:
        pred = predictions.get(it.index, "")
        f1s.append(item_caption_f1(it, pred))
        exact += any(caption_words(g) == caption_words(pred) for g in answers_of(it))
    mean = 100 * sum(f1s) / len(f1s)
    return BenchmarkScore(
        score=mean, n=len(items), metric="word F1 (%)", details={"exact_match": 100 * exact / len(items)}
    )
