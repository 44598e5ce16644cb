"""Multiple-choice benchmarks (MMBench, SEED-Image, AI2D, RealWorldQA, MMMU, custom `mcq`) scored
as VLMEvalKit scores them with the ``exact_matching`` judge (vlmeval/dataset/image_mcq.py and
utils/multiple_choice.py): the option letter is read from the answer (matching.infer_option), an
answer no rule maps to an option counts as 'Z', and an item is right when that letter equals the
``answer`` cell exactly.

MMBench is evaluated circularly, as VLMEvalKit does for every MMBench set: a question's rotated
copies share its ``g_index`` (a column, or ``index mod 1,000,000``), its main row is the one whose
index equals ``g_index``, and the question counts only when every copy present is right. A
question whose main row is absent is not scored.

MMMU's open questions (no option A) become A = the gold answer, B = 'Other Answers'
(MMMU_preproc), and their gold letter is the answer itself when it is one capital letter,
else A. With a ``split`` column every split is reported, and the headline is the split VLMEvalKit
reports first (test, then validation, val, dev)."""

from __future__ import annotations

import string
from collections import defaultdict

from megatron_sail.eval.matching import infer_option
from megatron_sail.eval.result import BenchmarkScore, bad_item

_CIRCULAR_OFFSET = 1_000_000
_SPLIT_PREFERENCE = ("test", "validation", "val", "dev")
"""VLMEvalKit's primary-metric order among splits (image_base._choose_primary_metric_key)."""


def choices_of(item) -> dict:
    """Option letter -> text for the options the row has (columns A, B, ...)."""
    return {c: item.get(c) for c in string.ascii_uppercase if item.get(c) not in (None, "")}


def _mmmu_choices(item) -> dict:
    """An open MMMU question (no option A) as VLMEvalKit's MMMU_preproc rewrites it."""
    return {**choices_of(item), "A": item.get("answer", ""), "B": "Other Answers"}


def _gold_and_choices(item, mmmu: bool, bad: list) -> tuple[str, dict]:
    """The gold letter and the options one item is scored with; oddities go to ``bad``."""
    answer = item.get("answer", "")
    if mmmu:
        choices = choices_of(item) if item.get("A") else _mmmu_choices(item)
        gold = answer if len(answer) == 1 and answer in string.ascii_uppercase else "A"
        if item.get("A") and answer not in choices:
            bad.append(
                bad_item(
                    item.index,
                    f"answer {answer!r} is not one of the options {''.join(sorted(choices))}; never right",
                )
            )
        return gold, choices
    choices = choices_of(item)
    if answer not in choices:
        what = (
            "no answer"
            if not answer
            else f"answer {answer!r} is not one of the options {''.join(sorted(choices)) or '(none)'}"
        )
        bad.append(bad_item(item.index, f"{what}; never right"))
    return answer, choices


def _as_int(text: str) -> int | None:
    """An integer cell ('12', '12.0'), or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _group_of(item) -> int | None:
    """The circular group (original question's index) of a row; None for a non-integer index."""
    index = _as_int(item.index)
    if index is None:
        return None
    if item.get("g_index"):
        return _as_int(item.get("g_index"))
    return index % _CIRCULAR_OFFSET


def _accuracy(rows: list[tuple[dict, bool]]) -> dict:
    """Overall, per-category and per-l2-category accuracy (%) of (row, hit) pairs."""
    out = {"overall": 100 * sum(h for _, h in rows) / len(rows) if rows else 0.0}
    for key, col in (("categories", "category"), ("l2_categories", "l2-category")):
        groups = defaultdict(list)
        for it, h in rows:
            if it.get(col):
                groups[it.get(col)].append(h)
        if groups:
            out[key] = {c: 100 * sum(v) / len(v) for c, v in sorted(groups.items())}
    return out


def _headline_split(splits: list[str]) -> str:
    """The split whose accuracy is the headline."""
    for sp in _SPLIT_PREFERENCE:
        if sp in splits:
            return sp
    return sorted(splits)[0]


def _circular(items, hits: list[bool], bad: list) -> tuple[list, dict]:
    """(main row, question right) per question whose main row is present."""
    groups, mains = defaultdict(list), {}
    for it, h in zip(items, hits):
        g = _group_of(it)
        if g is None:
            bad.append(
                bad_item(
                    it.index,
                    "index is not an integer: scored alone (VLMEvalKit needs integer MMBench indices)",
                )
            )
            g = it.index
        groups[g].append(h)
        if g == it.index or _as_int(it.index) == g:
            mains[g] = it
    orphans = [k for k in groups if k not in mains]
    return (
        [(mains[g], all(groups[g])) for g in sorted(mains, key=str)],
        {"groups_without_main_row": len(orphans)},
    )


def score_mcq(items, predictions: dict, mmmu: bool = False, circular: bool = False) -> BenchmarkScore:
    """Accuracy in percent: per question for circular MMBench, per item otherwise."""
    bad, hits = [], []
    for it in items:
        gold, choices = _gold_and_choices(it, mmmu, bad)
        pred = predictions.get(it.index, "")
        if not pred:
            bad.append(bad_item(it.index, "empty answer; never right"))
        hits.append((infer_option(pred, dict(choices)) or "Z") == gold)
    details: dict = {"mode": "circular" if circular else "vanilla"}
    if circular:
        rows, extra = _circular(items, hits, bad)
        details.update(extra, questions=len(rows), vanilla_acc=100 * sum(hits) / len(hits))
        per_item = {it.index: int(h) for it, h in rows}
    else:
        rows = list(zip(items, hits))
        per_item = {it.index: int(h) for it, h in rows}
    splits = sorted({it.get("split") for it, _ in rows if it.get("split")})
    if splits:
        details["splits"] = {
            sp: _accuracy([(it, h) for it, h in rows if it.get("split") == sp]) for sp in splits
        }
        head = _headline_split(splits)
        score, metric = details["splits"][head]["overall"], f"accuracy (%, {head} split)"
        details["all_splits"] = _accuracy(rows)["overall"]
    else:
        details.update(_accuracy(rows))
        score, metric = details.pop("overall"), f"accuracy (%, {details['mode']})"
    return BenchmarkScore(
        score=score, n=len(items), metric=metric, details=details, bad_items=bad, per_item=per_item
    )
