"""Yes/no benchmarks scored as VLMEvalKit scores them without an LLM judge: POPE (F1 headline),
MME (acc + acc+ per image pair, perception and cognition totals) and HallusionBench
(aAcc, fAcc, qAcc)."""
from __future__ import annotations

import hashlib
from collections import defaultdict

from megatron_sail.eval.matching import extract_yes_no
from megatron_sail.eval.result import BenchmarkScore

MME_PERCEPTION = ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark",
                  "position", "posters", "scene")
"""MME's perception subtasks (10 x 200 points)."""
MME_COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation",
                 "text_translation")
"""MME's cognition subtasks (VLMEvalKit calls the total 'reasoning'; 4 x 200 points)."""


def _truth(answer: str, where: str) -> str:
    """A yes/no ground truth as 'Yes' or 'No' (custom sets may write it lower-case)."""
    value = answer.strip().capitalize()
    if value not in ("Yes", "No"):
        raise ValueError(f"{where}: answer {answer!r} is not yes or no")
    return value


def _hits(items, predictions: dict) -> list[tuple[object, str, str, bool]]:
    """(item, truth, extracted, correct) per item."""
    out = []
    for it in items:
        truth = _truth(it.get("answer", ""), f"item {it.index}")
        got = extract_yes_no(predictions.get(it.index, ""))
        out.append((it, truth, got, got == truth))
    return out


def _f1(pairs: list[tuple[str, str]]) -> dict:
    """Precision, recall and F1 of the 'Yes' class, and accuracy, in percent."""
    tp = sum(t == "Yes" and p == "Yes" for t, p in pairs)
    fp = sum(t == "No" and p == "Yes" for t, p in pairs)
    fn = sum(t == "Yes" and p != "Yes" for t, p in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = sum(t == p for t, p in pairs) / len(pairs) if pairs else 0.0
    return {"f1": 100 * f1, "acc": 100 * acc, "precision": 100 * precision,
            "recall": 100 * recall}


def score_pope(items, predictions: dict) -> BenchmarkScore:
    """POPE: headline F1 over all items. An item whose ``category`` lists several splits
    ('adversarial,popular') counts once per split, as VLMEvalKit's POPE_rating counts it."""
    rows = _hits(items, predictions)
    exploded = [(c.strip(), t, p) for it, t, p, _ in rows
                for c in (it.get("category") or "").split(",") or [""]]
    overall = _f1([(t, p) for _, t, p in exploded])
    by_cat = defaultdict(list)
    for c, t, p in exploded:
        if c:
            by_cat[c].append((t, p))
    details = {"overall": overall, "categories": {c: _f1(v) for c, v in sorted(by_cat.items())},
               "unknown": sum(p == "Unknown" for _, _, p, _ in rows)}
    return BenchmarkScore(score=overall["f1"], n=len(rows), metric="F1 (%)", details=details)


def _image_key(item) -> str:
    """What identifies an item's image: ``image_path`` when the TSV has it, else its bytes."""
    if item.get("image_path"):
        return item.get("image_path")
    h = hashlib.sha1()
    for img in item.images:
        h.update(img if isinstance(img, bytes) else str(img).encode())
    return h.hexdigest()


def score_mme(items, predictions: dict) -> BenchmarkScore:
    """MME: per subtask, acc (per question) + acc+ (both questions of an image right), each in
    percent, so 200 points per subtask; headline = perception + cognition totals. Subtasks missing
    from the file (a --limit run, a custom set) add nothing."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for it, _, _, ok in _hits(items, predictions):
        groups[it.get("category", "")][_image_key(it)].append(ok)
    cats = {}
    for cat, per_image in groups.items():
        flat = [ok for v in per_image.values() for ok in v]
        acc = 100 * sum(flat) / len(flat)
        acc_plus = 100 * sum(all(v) for v in per_image.values()) / len(per_image)
        cats[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    perception = sum(cats[c]["score"] for c in MME_PERCEPTION if c in cats)
    cognition = sum(cats[c]["score"] for c in MME_COGNITION if c in cats)
    other = sorted(set(cats) - set(MME_PERCEPTION) - set(MME_COGNITION))
    total = perception + cognition + sum(cats[c]["score"] for c in other)
    details = {"perception": perception, "cognition": cognition, "categories": cats,
               "other_categories": other}
    return BenchmarkScore(score=total, n=sum(len(v) for g in groups.values() for v in g.values()),
                          metric="summed points", details=details)


def _hallusion_ids(index: str):
    """(set_id, figure_id, question_id) from a HallusionBench index such as
    'VD_figure_0_0_0_0' (fields 3, 4, 5 split on '_'), or None for another index form."""
    parts = index.split("_")
    return (parts[3], parts[4], parts[5]) if len(parts) >= 6 else None


def score_hallusionbench(items, predictions: dict) -> BenchmarkScore:
    """HallusionBench: aAcc (per question), fAcc (every question on a figure right), qAcc (a
    question right on every figure variant), grouped with ``l2-category``; headline = the mean of
    the three, as the OpenCompass leaderboard reports it. Without HallusionBench's index form only
    aAcc can be computed, and it is the headline."""
    rows = _hits(items, predictions)
    a_acc = 100 * sum(ok for *_, ok in rows) / len(rows) if rows else 0.0
    ids = [_hallusion_ids(it.index) for it, *_ in rows]
    if not rows or any(i is None for i in ids):
        return BenchmarkScore(score=a_acc, n=len(rows), metric="aAcc (%)", details={"aAcc": a_acc})
    fig, que = defaultdict(list), defaultdict(list)
    for (it, *_, ok), (s, f, q) in zip(rows, ids):
        l2 = it.get("l2-category", "")
        fig[(l2, s, f)].append(ok)
        que[(l2, s, q)].append(ok)
    f_acc = 100 * sum(all(v) for v in fig.values()) / len(fig)
    q_acc = 100 * sum(all(v) for v in que.values()) / len(que)
    details = {"aAcc": a_acc, "fAcc": f_acc, "qAcc": q_acc}
    return BenchmarkScore(score=(a_acc + f_acc + q_acc) / 3, n=len(rows),
                          metric="mean of aAcc, fAcc, qAcc (%)", details=details)
