"""Statistics of the data-quality loop: a paired bootstrap over benchmark items and the ranking
table of candidates.

Paired: every resample draws the same item indices for both candidates and rescoring uses the
benchmark's own rule (mean accuracy, F1, ANLS, ...), so the interval is about the difference on
the same questions, which is much tighter than comparing two independent intervals."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class BootstrapConfig:
    """How the confidence interval of a score difference is estimated."""

    resamples: int = 1000
    """Bootstrap resamples of the item list."""
    confidence: float = 0.95
    """Two-sided coverage of the percentile interval."""
    seed: int = 0
    """Seed of the resampling (the same seed gives the same interval)."""


def paired_bootstrap(
    items: Sequence,
    score_fn: Callable[[list], float],
    cfg: BootstrapConfig,
) -> tuple[float, float, float]:
    """(observed, low, high) of ``score_fn`` on the items and its percentile interval.

    ``score_fn(resampled_items)`` returns the *difference* of two candidates' scores on that
    item list (candidate minus reference), so both see the same resample."""
    if not items:
        raise ValueError("paired_bootstrap: no items")
    rng = random.Random(cfg.seed)
    n = len(items)
    draws = sorted(score_fn([items[rng.randrange(n)] for _ in range(n)]) for _ in range(cfg.resamples))
    alpha = (1.0 - cfg.confidence) / 2
    last = len(draws) - 1
    lo, hi = draws[math.floor(alpha * last)], draws[math.ceil((1 - alpha) * last)]
    return score_fn(list(items)), lo, hi


@dataclass
class RankRow:
    """One candidate in the ranking."""

    name: str
    score: float
    """Its score (the mean over benchmarks when there are several)."""
    diff: float
    """Score minus the best candidate's score (0 for the best)."""
    low: float
    """Lower end of the interval of ``diff``."""
    high: float
    """Upper end of the interval of ``diff``."""


def rank(
    scores: dict[str, float], diff_ci: Callable[[str, str], tuple[float, float, float]]
) -> list[RankRow]:
    """Candidates best first; ``diff_ci(name, best)`` gives (diff, low, high) of name vs best."""
    order = sorted(scores, key=lambda k: (-scores[k], k))
    best = order[0]
    rows = [RankRow(best, scores[best], 0.0, 0.0, 0.0)]
    for name in order[1:]:
        d, lo, hi = diff_ci(name, best)
        rows.append(RankRow(name, scores[name], d, lo, hi))
    return rows


def format_table(rows: list[RankRow], confidence: float, unit: str = "") -> str:
    """The ranking as fixed-width text; ``significant`` when the interval excludes 0."""
    pct = round(100 * confidence)
    head = f"{'rank':>4}  {'candidate':20s} {'score':>9}  {'diff vs best':>12}  {f'{pct}% CI of diff':>22}  verdict"
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows, 1):
        if i == 1:
            ci, verdict = "", "best"
        else:
            ci = f"[{r.low:+.2f}, {r.high:+.2f}]"
            verdict = "worse (significant)" if r.high < 0 else "not distinguishable"
        lines.append(f"{i:>4}  {r.name:20s} {r.score:9.2f}  {r.diff:+12.2f}  {ci:>22}  {verdict}")
    if unit:
        lines.append(f"(score: {unit})")
    return "\n".join(lines)


def ranking_title(benchmarks: list[str], confidence: float, resamples: int, setting: str) -> str:
    """ranking.png's title: what the bars are (the mean score over the named benchmarks) and
    what the error bars are (the bootstrap interval of each candidate's difference to the best,
    drawn around its score; none on the best)."""
    import textwrap

    lines = [
        f"mean score over {', '.join(benchmarks)} ({setting})",
        f"error bars: {round(100 * confidence)}% CI of the difference to the best candidate, "
        f"around each score (paired bootstrap over items, {resamples} resamples)",
    ]
    return "\n".join(textwrap.fill(line, 78) for line in lines)


def plot_ranking(rows: list[RankRow], path: str, title: str) -> None:
    """Bar chart of the scores with the difference interval drawn on each bar; atomic write.
    ``title``: ranking_title(...), which names the benchmarks and the error bars."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(rows) + 3), 3.8))
    xs = range(len(rows))
    ax.bar(xs, [r.score for r in rows], color=["#2e7d32"] + ["#4472c4"] * (len(rows) - 1))
    # the interval of each difference, drawn around the candidate's score (best + diff)
    ax.errorbar(
        xs,
        [r.score for r in rows],
        yerr=[[max(0.0, r.diff - r.low) for r in rows], [max(0.0, r.high - r.diff) for r in rows]],
        fmt="none",
        ecolor="black",
        capsize=4,
    )
    ax.set_xticks(list(xs), [r.name for r in rows], rotation=20)
    ax.set_ylabel("mean score")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=80)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
