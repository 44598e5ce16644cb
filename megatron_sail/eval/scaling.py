"""Data-scaling curves: benchmark score against pretraining tokens, fitted as
score = a + b * ln(tokens) (SAIL-VL's finding: linear in log tokens up to 655B), per benchmark
and for the average over benchmarks, read from the runs' metrics.jsonl."""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

PREFIX = "benchmarks/"
"""metrics.jsonl keys of benchmark scores (written by the in-training hook)."""
AVERAGE = "average"
"""Name of the fit on the mean over benchmarks."""


@dataclass
class LogFit:
    """score = a + b * ln(tokens), least squares."""

    a: float
    """Intercept (the score at one token, ln 1 = 0)."""
    b: float
    """Score gained per e-fold of tokens (b * ln 10 per decade)."""
    r2: float
    """Coefficient of determination of the fit (1 - SS_res / SS_tot; 1.0 for constant data
    that the fit matches exactly)."""
    points: int
    """Points fitted."""

    def predict(self, tokens: float) -> float:
        """The fitted score at ``tokens``."""
        return self.a + self.b * math.log(tokens)


def fit_log_linear(tokens, scores) -> LogFit:
    """Least-squares fit of score on ln(tokens); needs two distinct token counts."""
    x = np.log(np.asarray(tokens, dtype=np.float64))
    y = np.asarray(scores, dtype=np.float64)
    if len(x) != len(y) or len(np.unique(x)) < 2:
        raise ValueError(f"a log-linear fit needs points at two or more token counts, got "
                         f"{len(np.unique(x))}")
    b, a = np.polyfit(x, y, 1)
    res = float(np.sum((y - (a + b * x)) ** 2))
    tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - res / tot if tot > 0 else (1.0 if res < 1e-12 else 0.0)
    return LogFit(float(a), float(b), r2, len(x))


def read_points(run_dirs: list[str]) -> dict[str, list[tuple[float, float]]]:
    """{benchmark: [(consumed_tokens, score), ...]} over the runs, plus the average over
    benchmarks at each evaluation that scored all of them."""
    points: dict = defaultdict(list)
    names: set = set()
    evals = []
    for run in run_dirs:
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{run}: no metrics.jsonl")
        with open(path) as f:
            for n, line in enumerate(f, start=1):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                scores = {k[len(PREFIX):]: v for k, v in rec.items()
                          if k.startswith(PREFIX) and isinstance(v, (int, float))}
                tokens = rec.get("consumed_tokens")
                if not scores or not tokens or tokens <= 0:
                    continue
                for k, v in scores.items():
                    points[k].append((float(tokens), float(v)))
                names |= set(scores)
                evals.append((float(tokens), scores))
    for tokens, scores in evals:
        if set(scores) == names and len(names) > 1:
            points[AVERAGE].append((tokens, sum(scores.values()) / len(scores)))
    return dict(points)


def fit_all(points: dict) -> dict[str, LogFit]:
    """A fit per series that has two or more token counts."""
    fits = {}
    for name, pts in sorted(points.items()):
        if len({t for t, _ in pts}) >= 2:
            fits[name] = fit_log_linear([t for t, _ in pts], [s for _, s in pts])
    return fits


def plot(points: dict, fits: dict, budget: float, path: str) -> None:
    """Points and fitted lines against tokens (log axis), extended to the budget, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            xs = np.geomspace(t.min(), max(budget, t.max()), 50)
            ax.plot(xs, f.a + f.b * np.log(xs), color="tab:red",
                    label=f"{f.a:.2f} + {f.b:.3f} ln(T), R²={f.r2:.3f}")
            ax.axvline(budget, color="gray", linestyle=":", linewidth=1)
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("pretraining tokens")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
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
