"""Data-scaling curves: benchmark score against pretraining tokens, fitted as
score = a + b * ln(tokens) (SAIL-VL's finding: linear in log tokens up to 655B), per benchmark
and for the average over benchmarks, read from the runs' metrics.jsonl.

Benchmarks live on different scales (percent, OCRBench's 1,000 items, MME's 2,800 points), so
the average is taken over scores normalized to 0-100 (``normalized``); a per-benchmark fit stays
on the benchmark's own scale. A fitted line grows without bound, so an extrapolation is capped
at the metric's maximum and flagged (``Extrapolation.capped``)."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

PREFIX = "benchmarks/"
"""metrics.jsonl keys of benchmark scores (written by the in-training hook)."""
COUNT_PREFIX = "benchmarks_n/"
"""metrics.jsonl keys of the item counts behind each score."""
AVERAGE = "average"
"""Name of the fit on the mean over benchmarks (0-100 scale)."""
FULL_SCALE = {"ocrbench": 1000.0, "mme": 2800.0}
"""Top of the scale of benchmarks not scored in percent: OCRBench counts correct items out of
1,000, MME sums perception and cognition points (up to 2,800). Every other benchmark: 100."""


def base_name(name: str) -> str:
    """The scoring rule behind a benchmark name (``vqa@level1`` -> ``vqa``)."""
    return name.split("@", 1)[0]


def metric_max(name: str, items: Optional[int] = None) -> float:
    """The best possible score of a benchmark. OCRBench's score is a count of correct items, so
    a set of ``items`` items (a demo or a subset) tops out at ``items``; the full set at 1,000."""
    base = base_name(name)
    if base == "ocrbench" and items:
        return float(items)
    if name == AVERAGE:
        return 100.0
    return FULL_SCALE.get(base, 100.0)


def normalized(name: str, score: float, items: Optional[int] = None) -> float:
    """A score on the 0-100 scale (100 * score / the metric's maximum)."""
    return 100.0 * score / metric_max(name, items)


@dataclass
class LogFit:
    """score = a + b * ln(tokens), least squares."""

    a: float
    """Intercept (the score at one token, ln 1 = 0)."""
    b: float
    """Score gained per e-fold of tokens (b * ln 10 per decade)."""
    r2: Optional[float]
    """Coefficient of determination (1 - SS_res / SS_tot); None ("n/a") when the scores do not
    vary, where it is undefined (0/0)."""
    points: int
    """Points fitted."""

    def predict(self, tokens: float) -> float:
        """The fitted score at ``tokens`` (uncapped)."""
        return self.a + self.b * math.log(tokens)


@dataclass
class Extrapolation:
    """A fit's score at a token budget, capped at the metric's range."""

    value: float
    """The score, within [0, maximum]."""
    raw: float
    """The fitted line's value before capping."""
    capped: bool
    """True when the line left [0, maximum] and ``value`` was clipped (do not read it as a
    prediction: the log-linear law stops holding before the metric saturates)."""


def extrapolate(fit: LogFit, tokens: float, maximum: float) -> Extrapolation:
    """The fit's score at ``tokens``, clipped to [0, maximum] and flagged when clipped."""
    raw = fit.predict(tokens)
    value = min(max(raw, 0.0), maximum)
    return Extrapolation(value, raw, value != raw)


def format_r2(r2: Optional[float]) -> str:
    """R^2 as printed: four decimals, or n/a."""
    return "n/a" if r2 is None else f"{r2:.4f}"


def fit_log_linear(tokens, scores) -> LogFit:
    """Least-squares fit of score on ln(tokens); needs two distinct token counts."""
    x = np.log(np.asarray(tokens, dtype=np.float64))
    y = np.asarray(scores, dtype=np.float64)
    if len(x) != len(y) or len(np.unique(x)) < 2:
        raise ValueError(
            f"a log-linear fit needs points at two or more token counts, got {len(np.unique(x))}"
        )
    b, a = np.polyfit(x, y, 1)
    res = float(np.sum((y - (a + b * x)) ** 2))
    tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - res / tot if tot > 1e-12 * max(1.0, float(np.max(np.abs(y)))) ** 2 else None
    return LogFit(float(a), float(b), r2, len(x))


@dataclass
class Points:
    """Scores per series read from runs."""

    series: dict
    """{benchmark: [(consumed_tokens, score), ...]} on each benchmark's own scale, plus
    AVERAGE: the mean of the 0-100 normalized scores at each evaluation that scored all."""
    maxima: dict
    """{benchmark: its best possible score} (what extrapolations are capped at)."""
    skipped: list
    """(folder, reason) of the folders that held no usable metrics."""


def _read_run(path: str):
    """Evaluation records (tokens, {name: score}, {name: items}) of one metrics.jsonl."""
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if not isinstance(rec, dict):
                continue
            scores = {
                k[len(PREFIX) :]: v
                for k, v in rec.items()
                if k.startswith(PREFIX) and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            tokens = rec.get("consumed_tokens")
            if not scores or not isinstance(tokens, (int, float)) or tokens <= 0:
                continue
            counts = {
                k[len(COUNT_PREFIX) :]: v
                for k, v in rec.items()
                if k.startswith(COUNT_PREFIX) and isinstance(v, int)
            }
            yield float(tokens), scores, counts


def read_points(run_dirs: list[str], log: Callable[[str], None] = lambda s: None) -> Points:
    """Scores of every evaluation in the runs (several runs, or one run evaluated during
    training). A folder without metrics.jsonl, or whose metrics hold no benchmark score with a
    token count, is skipped and named through ``log``."""
    series: dict = defaultdict(list)
    maxima: dict = {}
    names: set = set()
    evals, skipped = [], []
    for run in run_dirs:
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.isfile(path):
            skipped.append((run, "no metrics.jsonl"))
            log(f"skip {run}: no metrics.jsonl")
            continue
        found = 0
        for tokens, scores, counts in _read_run(path):
            found += 1
            for k, v in scores.items():
                series[k].append((tokens, float(v)))
                maxima[k] = metric_max(k, counts.get(k))
            names |= set(scores)
            evals.append((tokens, scores, counts))
        if not found:
            skipped.append((run, "no benchmarks/* score with consumed_tokens in metrics.jsonl"))
            log(
                f"skip {run}: no benchmarks/* score with consumed_tokens in its metrics.jsonl "
                "(train with --eval-benchmark NAME=PATH)"
            )
    for tokens, scores, counts in evals:
        if set(scores) == names and len(names) > 1:
            norm = [normalized(k, v, counts.get(k)) for k, v in scores.items()]
            series[AVERAGE].append((tokens, sum(norm) / len(norm)))
            maxima[AVERAGE] = 100.0
    return Points(dict(series), maxima, skipped)


def fit_all(points: dict) -> dict[str, LogFit]:
    """A fit per series that has two or more token counts."""
    fits = {}
    for name, pts in sorted(points.items()):
        if len({t for t, _ in pts}) >= 2:
            fits[name] = fit_log_linear([t for t, _ in pts], [s for _, s in pts])
    return fits


def plot(points: dict, fits: dict, budget: float, path: str, maxima: Optional[dict] = None) -> None:
    """Points and fitted lines against tokens (log axis), extended to the budget and capped at
    each metric's maximum, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maxima = maxima or {}
    names = [n for n in sorted(points) if n != AVERAGE] + ([AVERAGE] if AVERAGE in points else [])
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        t = np.array([p[0] for p in points[name]])
        s = np.array([p[1] for p in points[name]])
        ax.scatter(t, s, s=18, color="tab:blue", zorder=3)
        if name in fits:
            f = fits[name]
            top = maxima.get(name, metric_max(name))
            xs = np.geomspace(t.min(), max(budget, t.max()), 50)
            ax.plot(
                xs,
                np.clip(f.a + f.b * np.log(xs), 0.0, top),
                color="tab:red",
                label=f"{f.a:.2f} + {f.b:.3f} ln(T), R²={format_r2(f.r2)}",
            )
            ax.axvline(budget, color="gray", linestyle=":", linewidth=1)
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xscale("log")
        ax.set_title(name + (" (0-100)" if name == AVERAGE else ""), fontsize=10)
        ax.set_xlabel("pretraining tokens")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def parse_tokens(text: str) -> float:
    """'655B', '1.5T', '300M', '2e9' -> a token count."""
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    t = text.strip().upper()
    value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    if value <= 0:
        raise ValueError(f"token budget must be positive, got {text!r}")
    return value


def fit_report(points: Points, budget: float) -> dict:
    """{series: a, b, r2 (None = n/a), points, maximum, budget_tokens, at_budget, at_budget_raw,
    capped} for every series with two or more token counts, and {series: reason} under
    ``"no_fit"`` for the others (what tools/scaling_law.py writes to fits.json)."""
    out: dict = {}
    no_fit = {}
    fits = fit_all(points.series)
    for name in sorted(points.series):
        if name not in fits:
            no_fit[name] = f"{len(points.series[name])} point(s) at one token count"
            continue
        f = fits[name]
        top = points.maxima.get(name, metric_max(name))
        e = extrapolate(f, budget, top)
        out[name] = {
            "a": f.a,
            "b": f.b,
            "r2": f.r2,
            "points": f.points,
            "maximum": top,
            "budget_tokens": budget,
            "at_budget": e.value,
            "at_budget_raw": e.raw,
            "capped": e.capped,
        }
    if no_fit:
        out["no_fit"] = no_fit
    return out
