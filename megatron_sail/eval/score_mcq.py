"""Multiple-choice benchmarks (MMBench, SEED-Image, AI2D, RealWorldQA, MMMU, custom `mcq`):
option-letter extraction and exact match against the answer letter, with no LLM judge (a
prediction no rule can map to an option is wrong, as under VLMEvalKit's `exact_matching`).

Circular evaluation (MMBench): when a file holds rotated copies of a question (a ``g_index``
column, or integer indices of 1,000,000 and more whose copy k is ``index + k * 1e6``), a question
counts only if every copy present is answered right, and the score is over the original
questions; a file without copies is scored per item ("vanilla")."""
from __future__ import annotations

import string
from collections import defaultdict

from megatron_sail.eval.matching import infer_option
from megatron_sail.eval.result import BenchmarkScore

_CIRCULAR_OFFSET = 1_000_000


def choices_of(item) -> dict:
    """Option letter -> text for the options the row has (columns A, B, ...)."""
    return {c: item.get(c) for c in string.ascii_uppercase if item.get(c) not in (None, "")}


def mmmu_open_choices(item) -> dict:
    """MMMU's open questions have no options; VLMEvalKit scores them as A = the answer,
    B = 'Other Answers' (MMMU_preproc), so a prediction containing the answer text is right."""
    return {"A": item.get("answer", ""), "B": "Other Answers"}


def _gold(item, choices: dict) -> str:
    """The answer letter (an open MMMU question's gold is 'A')."""
    ans = item.get("answer", "").strip()
    if ans in choices:
        return ans
    raise ValueError(f"item {item.index}: answer {ans!r} is not one of the options "
                     f"{sorted(choices)}")


def _group_ids(items) -> list[str] | None:
    """Circular groups (the original question's index per row), or None when there are none."""
    if all(it.get("g_index") for it in items):
        return [str(int(float(it.get("g_index")))) for it in items]
    try:
        idx = [int(it.index) for it in items]
    except ValueError:
        return None
    if not any(i >= _CIRCULAR_OFFSET for i in idx):
        return None
    return [str(i % _CIRCULAR_OFFSET) for i in idx]


def score_mcq(items, predictions: dict, open_as_mmmu: bool = False) -> BenchmarkScore:
    """Accuracy in percent (circular when the file has the copies), per-category accuracy too."""
    hits, cats = [], []
    for it in items:
        choices = choices_of(it)
        if not choices:
            if not open_as_mmmu:
                raise ValueError(f"item {it.index}: no options (columns A, B, ...)")
            choices = mmmu_open_choices(it)
            gold = "A"
        else:
            gold = _gold(it, choices)
        hits.append(infer_option(predictions.get(it.index, ""), dict(choices)) == gold)
        cats.append(it.get("category", ""))
    groups = _group_ids(items)
    if groups is None:
        keys = [it.index for it in items]
        mode = "vanilla"
    else:
        keys, mode = groups, "circular"
    per_group, group_cat = defaultdict(list), {}
    for k, ok, c in zip(keys, hits, cats):
        per_group[k].append(ok)
        group_cat.setdefault(k, c)
    results = {k: all(v) for k, v in per_group.items()}
    by_cat = defaultdict(list)
    for k, ok in results.items():
        if group_cat[k]:
            by_cat[group_cat[k]].append(ok)
    acc = 100 * sum(results.values()) / len(results) if results else 0.0
    details = {"mode": mode, "questions": len(results),
               "categories": {c: 100 * sum(v) / len(v) for c, v in sorted(by_cat.items())}}
    if mode == "circular":
        details["vanilla_acc"] = 100 * sum(hits) / len(hits)
    return BenchmarkScore(score=acc, n=len(items), metric=f"accuracy (%, {mode})",
                          details=details)
