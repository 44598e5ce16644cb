"""Open-answer benchmarks: DocVQA/InfoVQA (ANLS), ChartQA (relaxed accuracy), TextVQA (VQA
accuracy over the annotators' answers), OCR-VQA (exact match), OCRBench (containment count) and a
custom `vqa` set (normalized exact match), following VLMEvalKit's image_vqa / vqa_eval /
ocrbench rules. The rules read the prediction as stored: only what VLMEvalKit's scorer itself
does (ChartQA and OCR-VQA strip the prediction, ANLS lower-cases and collapses spaces but
measures the length of the raw strings) happens here; SAIL-VL's answer post-processing belongs to
generation (BenchmarkSpec.postprocess)."""

from __future__ import annotations

import ast
from collections import defaultdict

from megatron_sail.eval.matching import levenshtein, normalize_vqa_answer
from megatron_sail.eval.result import BenchmarkScore, bad_item

ANLS_THRESHOLD = 0.5
"""ANLS: a normalized similarity under this counts 0."""
RELAXED_TOLERANCE = 0.05
"""ChartQA: a numeric answer within 5% of the gold one is right."""

OCRBENCH_GROUPS = {
    "Text Recognition": (
        "Regular Text Recognition",
        "Irregular Text Recognition",
        "Artistic Text Recognition",
        "Handwriting Recognition",
        "Digit String Recognition",
        "Non-Semantic Text Recognition",
    ),
    "Scene Text-centric VQA": ("Scene Text-centric VQA",),
    "Doc-oriented VQA": ("Doc-oriented VQA",),
    "Key Information Extraction": ("Key Information Extraction",),
    "Handwritten Mathematical Expression Recognition": ("Handwritten Mathematical Expression Recognition",),
}
"""OCRBench's five reported groups and the ten categories they sum."""
HME = "Handwritten Mathematical Expression Recognition"


def answers_of(item) -> list[str]:
    """The gold answers: a Python list literal in the cell (TextVQA's ten, DocVQA's few), or
    the cell itself."""
    cell = item.get("answer", "")
    if cell.strip().startswith("["):
        try:
            value = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
    return [cell]


def anls(golds: list[str], prediction: str) -> float:
    """1 - the smallest normalized edit distance to a gold answer (lower-cased, whitespace
    collapsed; normalized by the longer raw string); 0 below the threshold."""
    det = " ".join(prediction.strip().lower().split())
    dists = []
    for g in golds:
        gt = " ".join(g.strip().lower().split())
        length = max(len(g.upper()), len(prediction.upper()))
        dists.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    value = 1 - min(dists)
    return 0.0 if value < ANLS_THRESHOLD else value


def _to_float(text: str):
    """A number, a trailing '%' (or several: all go, as in VLMEvalKit) meaning hundredths;
    None for text."""
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(gold: str, prediction: str) -> bool:
    """ChartQA's relaxed accuracy (pix2struct): numbers within 5% relative, text exact
    (case-insensitive). A gold of 0 falls back to the text comparison, as in the reference."""
    p, g = _to_float(prediction), _to_float(gold)
    if p is not None and g:
        return abs(p - g) / abs(g) <= RELAXED_TOLERANCE
    return prediction.lower() == gold.lower()


def vqa_accuracy(golds: list[str], prediction: str) -> float:
    """VQA accuracy: for each gold answer left out in turn, min(1, matches among the others / 3),
    averaged; answers normalized (punctuation, digits, articles)."""
    gts = [normalize_vqa_answer(g) for g in golds]
    pred = normalize_vqa_answer(prediction)
    accs = [min(1.0, sum(o == pred for j, o in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


def exact_match(golds: list[str], prediction: str) -> float:
    """1 when the stripped, lower-cased prediction equals a gold answer."""
    p = prediction.strip().lower()
    return float(any(g.strip().lower() == p for g in golds))


def normalized_match(golds: list[str], prediction: str) -> float:
    """Custom `vqa` sets: share of gold answers equal to the prediction after the VQA
    normalization (VLMEvalKit's default VQA rule)."""
    pred = normalize_vqa_answer(prediction)
    return sum(normalize_vqa_answer(g) == pred for g in golds) / len(golds)


RULES = {
    "anls": lambda g, p: anls(g, p),
    "relaxed": lambda g, p: float(any(relaxed_correct(x, p.strip()) for x in g)),
    "vqa_accuracy": vqa_accuracy,
    "exact": exact_match,
    "normalized": normalized_match,
}
"""Per-item rules by name; each returns a value in [0, 1]."""


def _golds_and_bad(item, prediction: str, bad: list) -> list[str]:
    """The item's gold answers; an empty gold or prediction is listed in ``bad``."""
    if not item.get("answer"):
        bad.append(bad_item(item.index, "no gold answer"))
    if not prediction:
        bad.append(bad_item(item.index, "empty answer"))
    return answers_of(item)


def _means(values: list, items, column: str) -> dict:
    """Mean value (%) per distinct non-empty ``column`` cell."""
    groups = defaultdict(list)
    for v, it in zip(values, items):
        if it.get(column):
            groups[it.get(column)].append(v)
    return {c: 100 * sum(v) / len(v) for c, v in sorted(groups.items())}


def score_vqa(items, predictions: dict, rule: str) -> BenchmarkScore:
    """Mean per-item value of ``rule`` in percent, with per-split means when the file has a
    ``split`` column (VLMEvalKit then reports no categories), else per-category means."""
    fn, bad = RULES[rule], []
    values = [
        fn(_golds_and_bad(it, predictions.get(it.index, ""), bad), predictions.get(it.index, ""))
        for it in items
    ]
    mean = 100 * sum(values) / len(values) if values else 0.0
    if any(it.get("split") for it in items):
        details = {"splits": _means(values, items, "split")}
    else:
        details = {"categories": _means(values, items, "category")}
    return BenchmarkScore(
        score=mean,
        n=len(values),
        metric=f"{rule} (%)",
        details=details,
        bad_items=bad,
        per_item={it.index: v for it, v in zip(items, values)},
    )


def ocrbench_correct(golds: list[str], prediction: str, category: str) -> bool:
    """OCRBench: some gold answer is contained in the prediction, case-insensitively, newlines
    as spaces; for handwritten math (HME100k) case is kept and every space is removed instead."""
    for g in golds:
        if category == HME:
            if g.strip().replace("\n", " ").replace(" ", "") in prediction.strip().replace("\n", " ").replace(
                " ", ""
            ):
                return True
        elif g.lower().strip().replace("\n", " ") in prediction.lower().strip().replace("\n", " "):
            return True
    return False


def score_ocrbench(items, predictions: dict) -> BenchmarkScore:
    """Count of correct items (out of 1,000 on the full OCRBench), with per-category counts."""
    counts, bad, per_item = defaultdict(int), [], {}
    for it in items:
        cat = it.get("category", "")
        pred = predictions.get(it.index, "")
        per_item[it.index] = int(ocrbench_correct(_golds_and_bad(it, pred, bad), pred, cat))
        counts[cat] += per_item[it.index]
    groups = {g: sum(counts.get(c, 0) for c in cs) for g, cs in OCRBENCH_GROUPS.items()}
    known = {c for cs in OCRBENCH_GROUPS.values() for c in cs}
    other = {c: n for c, n in counts.items() if c not in known}
    total = sum(counts.values())
    details = {
        "groups": groups,
        "categories": dict(counts),
        "other_categories": other,
        "final_score_norm": total / 10,
    }
    return BenchmarkScore(
        score=float(total),
        n=len(items),
        metric="correct items",
        details=details,
        bad_items=bad,
        per_item=per_item,
    )
