"""Tables, intervals and figures of the paper-claims study (report.md, report.json, PNGs).

The curriculum comparison uses the paired bootstrap of tools/data_ablation.py
(curate/ablation.py ``stratified_bootstrap``): benchmark items are resampled within each level
set, the same indices for both arms, each arm's score on a resample is the mean over its seeds
of the level's rule (vqa accuracy), averaged over the levels; the interval is the percentile
interval of arm minus one-stage."""

from __future__ import annotations

import json
import os
from typing import Optional

from megatron_sail.curate.ablation import stratified_bootstrap
from megatron_sail.curate.ablation_stats import BootstrapConfig


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    _plt().close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def scaling(run_dirs: list[str], budget: float, png: str) -> dict:
    """Fits of score = a + b ln(tokens) on the in-training scores (eval/scaling.py), the plot."""
    from megatron_sail.eval.scaling import fit_all, fit_report, plot, read_points

    points = read_points(run_dirs)
    plot(points.series, fit_all(points.series), budget, png, points.maxima)
    report = fit_report(points, budget)
    report.pop("no_fit", None)
    tokens = sorted({t for pts in points.series.values() for t, _ in pts})
    return {"fits": report, "token_counts": tokens, "figure": os.path.basename(png)}


class LevelScorer:
    """Per-item rescoring of the level sets from the runs' stored predictions."""

    def __init__(self, benchmarks: dict):
        from megatron_sail.eval.registry import get_benchmark
        from megatron_sail.eval.tsv import read_items

        self.names = list(benchmarks)
        self.specs = {b: get_benchmark(b) for b in benchmarks}
        self.items = {b: read_items(p) for b, p in benchmarks.items()}

    def predictions(self, run_dir: str) -> dict:
        """{benchmark: {index: prediction}} of the run's final evaluation."""
        from megatron_sail.demo.paper_runs import final_predictions
        from megatron_sail.eval.prediction_files import canonical_index, read_predictions

        out = {}
        for b, path in final_predictions(run_dir, self.names).items():
            by = read_predictions(path)
            out[b] = {it.index: by.get(canonical_index(it.index), "") for it in self.items[b]}
        return out

    def score(self, preds: dict, b: str, items: list) -> float:
        return self.specs[b].score(items, preds[b]).score

    def arm(self, preds_per_seed: list, b: str, items: list) -> float:
        """Mean over seeds of the level's score on these items."""
        return sum(self.score(p, b, items) for p in preds_per_seed) / len(preds_per_seed)


def quantity(runs: dict, scorer: LevelScorer, png: str) -> dict:
    """{quantity: {mean, per level}} and the curve (score against SFT samples, log axis)."""
    out = {}
    for q, run in sorted(runs.items()):
        p = scorer.predictions(run)
        per = {b: scorer.score(p, b, scorer.items[b]) for b in scorer.names}
        out[int(q)] = {"mean": sum(per.values()) / len(per), "levels": per}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    qs = sorted(out)
    ax.plot(qs, [out[q]["mean"] for q in qs], "o-", color="black", label="mean")
    for b in scorer.names:
        ax.plot(qs, [out[q]["levels"][b] for q in qs], ".--", alpha=0.7, label=b)
    ax.set_xscale("log")
    ax.set_xlabel("SFT samples")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("SFT data quantity")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, png)
    return out


def curriculum(
    arms: dict, scorer: LevelScorer, png: str, boot: BootstrapConfig, reference: str = "one_stage"
) -> dict:
    """Mean score per arm (over seeds and levels), per level and per seed, and for every arm
    the paired-bootstrap interval of its difference to ``reference``."""
    preds = {a: [scorer.predictions(r) for r in runs] for a, runs in arms.items()}
    tagged = [(b, it) for b in scorer.names for it in scorer.items[b]]
    out: dict = {"mean": {}, "levels": {}, "per_seed": {}, "diff_vs_" + reference: {}}
    for a, ps in preds.items():
        per = {b: scorer.arm(ps, b, scorer.items[b]) for b in scorer.names}
        out["levels"][a] = per
        out["mean"][a] = sum(per.values()) / len(per)
        out["per_seed"][a] = [
            sum(scorer.score(p, b, scorer.items[b]) for b in scorer.names) / len(scorer.names) for p in ps
        ]
    for a in preds:
        if a == reference:
            continue

        def fn(sample: list, a=a) -> float:
            by_b: dict = {}
            for b, it in sample:
                by_b.setdefault(b, []).append(it)
            return sum(
                scorer.arm(preds[a], b, v) - scorer.arm(preds[reference], b, v) for b, v in by_b.items()
            ) / len(by_b)

        d, lo, hi = stratified_bootstrap(tagged, fn, boot)
        out["diff_vs_" + reference][a] = {
            "diff": d,
            "ci_low": lo,
            "ci_high": hi,
            "confidence": boot.confidence,
            "resamples": boot.resamples,
        }
    plt = _plt()
    names = list(preds)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(names)), 3.4))
    xs = range(len(names))
    ax.bar(
        xs, [out["mean"][a] for a in names], color=["#4472c4" if a != reference else "#999999" for a in names]
    )
    for x, a in zip(xs, names):
        ax.scatter([x] * len(out["per_seed"][a]), out["per_seed"][a], color="black", s=12, zorder=3)
        if a in out["diff_vs_" + reference]:
            c = out["diff_vs_" + reference][a]
            base = out["mean"][reference]
            ax.errorbar(
                [x],
                [out["mean"][a]],
                yerr=[
                    [max(0.0, out["mean"][a] - (base + c["ci_low"]))],
                    [max(0.0, (base + c["ci_high"]) - out["mean"][a])],
                ],
                fmt="none",
                ecolor="red",
                capsize=5,
            )
    ax.set_xticks(list(xs), [a.replace("_", " ") for a in names], fontsize=8)
    ax.set_ylabel("mean accuracy over levels (%)")
    ax.set_title(
        f"curriculum vs {reference} (red: {round(100 * boot.confidence)}% CI of the difference)", fontsize=8
    )
    _save(fig, png)
    return out


def caption(summary_path: Optional[str], png: str) -> Optional[dict]:
    """Claim 1 from examples/sail_caption.sh's summary.json (None when there is none)."""
    if not summary_path or not os.path.isfile(summary_path):
        return None
    with open(summary_path) as f:
        s = json.load(f)
    f1 = s["caption_word_f1"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 3.2))
    ax.bar([0, 1], [f1["recaptioned"], f1["original"]], color=["#2e7d32", "#999999"])
    lo, hi = s["gain_ci95"]
    ax.errorbar(
        [0],
        [f1["recaptioned"]],
        yerr=[
            [max(0.0, f1["recaptioned"] - (f1["original"] + lo))],
            [max(0.0, (f1["original"] + hi) - f1["recaptioned"])],
        ],
        fmt="none",
        ecolor="red",
        capsize=5,
    )
    ax.set_xticks([0, 1], ["recaptioned", "original text"])
    ax.set_ylabel("held-out caption word F1")
    ax.set_title("SAIL-Caption: recaption vs original", fontsize=9)
    _save(fig, png)
    return {
        "source": os.path.abspath(summary_path),
        "caption_word_f1": f1,
        "gain": s["gain"],
        "gain_ci95": s["gain_ci95"],
        "items": s.get("items"),
        "figure": os.path.basename(png),
    }


def spearman(xs: list, ys: list) -> float:
    """Rank correlation (average ranks for ties)."""
    import numpy as np

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort(kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for x in np.unique(v):  # ties: the mean rank
            m = v == x
            r[m] = r[m].mean()
        return r

    a, b = ranks(xs), ranks(ys)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
