"""Yes/no benchmarks scored as VLMEvalKit scores them without an LLM judge: POPE (F1 headline),
MME (acc + acc+ per image pair, perception and cognition totals) and HallusionBench
(aAcc, fAcc, qAcc)."""

from __future__ import annotations

import hashlib
from collections import defaultdict

from megatron_sail.eval.matching import extract_yes_no
from megatron_sail.eval.result import BenchmarkScore, bad_item

MME_PERCEPTION = (
    "OCR",
    "artwork",
    "celebrity",
    "color",
    "count",
    "existence",
    "landmark",
    "position",
    "posters",
    "scene",
)
"""MME's perception subtasks (10 x 200 points)."""
MME_COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")
"""MME's cognition subtasks (VLMEvalKit calls the total 'reasoning'; 4 x 200 points)."""


def _hits(items, predictions: dict, bad: list) -> list[tuple[object, str, str, bool]]:
    """(item, truth, extracted, correct) per item. As in VLMEvalKit, an item is right when its
    ``answer`` cell equals the extracted 'Yes'/'No' exactly; a truth that is neither (or an
    empty answer) is listed in ``bad`` and scored by the same rule."""
    out = []
    for it in items:
        truth = it.get("answer", "")
        if truth not in ("Yes", "No"):
            bad.append(
                bad_item(
                    it.index,
                    f"answer {truth!r} is not 'Yes' or 'No'"
                    + (" (VLMEvalKit compares it exactly)" if truth else ""),
                )
            )
        pred = predictions.get(it.index, "")
        if not pred:
            bad.append(bad_item(it.index, "empty answer; never right"))
        got = extract_yes_no(pred)
        out.append((it, truth, got, got == truth))
    return out


def _f1(pairs: list[tuple[str, str]]) -> dict:
    """Precision, recall and F1 of the 'Yes' class, and accuracy, in percent (POPE_rating: a
    truth other than 'Yes' counts as a negative)."""
    tp = sum(t == "Yes" and p == "Yes" for t, p in pairs)
    fp = sum(t != "Yes" and p == "Yes" for t, p in pairs)
    fn = sum(t == "Yes" and p != "Yes" for t, p in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = sum(t == p for t, p in pairs) / len(pairs) if pairs else 0.0
    return {"f1": 100 * f1, "acc": 100 * acc, "precision": 100 * precision, "recall": 100 * recall}


def _verdicts(rows) -> dict:
    """index -> 1/0 per item."""
    return {it.index: int(ok) for it, _, _, ok in rows}


def score_pope(items, predictions: dict) -> BenchmarkScore:
    """POPE: headline F1 over all items. An item whose ``category`` lists several splits
    ('adversarial,popular') counts once per split, as VLMEvalKit's POPE_rating counts it."""
    bad: list = []
    rows = _hits(items, predictions, bad)
    exploded = [(c, t, p) for it, t, p, _ in rows for c in (it.get("category") or "").split(",")]
    overall = _f1([(t, p) for _, t, p in exploded])
    by_cat = defaultdict(list)
    for c, t, p in exploded:
        if c:
            by_cat[c].append((t, p))
    details = {
        "overall": overall,
        "categories": {c: _f1(v) for c, v in sorted(by_cat.items())},
        "unknown": sum(p == "Unknown" for _, _, p, _ in rows),
    }
    return BenchmarkScore(
        score=overall["f1"],
        n=len(rows),
        metric="F1 (%)",
        details=details,
        bad_items=bad,
        per_item=_verdicts(rows),
    )


def _image_key(item) -> str:
    """What identifies an item's image: ``image_path`` when the TSV has it (VLMEvalKit's key),
    else its bytes."""
    if item.get("image_path"):
        return item.get("image_path")
    h = hashlib.sha1()
    for img in item.images:
        h.update(img if isinstance(img, bytes) else str(img).encode())
    return h.hexdigest()


def score_mme(items, predictions: dict) -> BenchmarkScore:
    """MME: per subtask, acc (per question) + acc+ (an image's first two questions both right,
    as MME_rating multiplies them), each in percent, so 200 points per subtask; headline =
    perception + cognition totals. Subtasks missing from the file (a --limit run, a custom set)
    add nothing; an image with one question counts that one for acc+ and is listed."""
    bad: list = []
    rows = _hits(items, predictions, bad)
    groups: dict = defaultdict(lambda: defaultdict(list))
    for it, _, _, ok in rows:
        groups[it.get("category", "")][_image_key(it)].append((it.index, ok))
    cats = {}
    for cat, per_image in groups.items():
        flat = [ok for v in per_image.values() for _, ok in v]
        for v in per_image.values():
            if len(v) != 2:
                bad.append(
                    bad_item(
                        v[0][0],
                        f"its image has {len(v)} question(s); MME pairs two "
                        "(acc+ uses the first two, or the only one)",
                    )
                )
        acc = 100 * sum(flat) / len(flat)
        acc_plus = 100 * sum(all(ok for _, ok in v[:2]) for v in per_image.values()) / len(per_image)
        cats[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    perception = sum(cats[c]["score"] for c in MME_PERCEPTION if c in cats)
    cognition = sum(cats[c]["score"] for c in MME_COGNITION if c in cats)
    other = sorted(set(cats) - set(MME_PERCEPTION) - set(MME_COGNITION))
    total = perception + cognition + sum(cats[c]["score"] for c in other)
    details = {
        "perception": perception,
        "cognition": cognition,
        "categories": cats,
        "other_categories": other,
    }
    return BenchmarkScore(
        score=total,
        n=len(rows),
        metric="summed points",
        details=details,
        bad_items=bad,
        per_item=_verdicts(rows),
    )


def _hallusion_ids(index: str):
    """(set_id, figure_id, question_id) from a HallusionBench index such as
    'VD_figure_0_0_0_0' (fields 3, 4, 5 split on '_'), or None for another index form."""
    parts = index.split("_")
    return (parts[3], parts[4], parts[5]) if len(parts) >= 6 else None


def _hallusion_accs(rows) -> dict:
    """aAcc, fAcc and qAcc (%) of (l2-category, ids, correct) triples."""
    fig, que = defaultdict(list), defaultdict(list)
    for l2, (s, f, q), ok in rows:
        fig[(l2, s, f)].append(ok)
        que[(l2, s, q)].append(ok)
    return {
        "aAcc": 100 * sum(ok for *_, ok in rows) / len(rows),
        "fAcc": 100 * sum(all(v) for v in fig.values()) / len(fig),
        "qAcc": 100 * sum(all(v) for v in que.values()) / len(que),
    }


def score_hallusionbench(items, predictions: dict) -> BenchmarkScore:
    """HallusionBench: aAcc (per question), fAcc (every question on a figure right), qAcc (a
    question right on every figure variant), grouped with ``l2-category``; headline = the mean of
    the three, as the OpenCompass leaderboard reports it, with the same three per ``category``
    and ``l2-category``. Without HallusionBench's index form only aAcc can be computed, and it is
    the headline."""
    bad: list = []
    rows = _hits(items, predictions, bad)
    a_acc = 100 * sum(ok for *_, ok in rows) / len(rows) if rows else 0.0
    ids = [_hallusion_ids(it.index) for it, *_ in rows]
    if not rows or any(i is None for i in ids):
        return BenchmarkScore(
            score=a_acc,
            n=len(rows),
            metric="aAcc (%)",
            details={"aAcc": a_acc},
            bad_items=bad,
            per_item=_verdicts(rows),
        )
    triples = [(it.get("l2-category", ""), i, ok) for (it, *_, ok), i in zip(rows, ids)]
    details = _hallusion_accs(triples)
    for key, col in (("categories", "category"), ("l2_categories", "l2-category")):
        names = sorted({it.get(col) for it, *_ in rows if it.get(col)})
        details[key] = {
            c: _hallusion_accs([t for (it, *_), t in zip(rows, triples) if it.get(col) == c]) for c in names
        }
    return BenchmarkScore(
        score=(details["aAcc"] + details["fAcc"] + details["qAcc"]) / 3,
        n=len(rows),
        metric="mean of aAcc, fAcc, qAcc (%)",
        details=details,
        bad_items=bad,
        per_item=_verdicts(rows),
    )
