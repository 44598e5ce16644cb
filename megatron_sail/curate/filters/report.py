"""The report's histogram PNG: caption lengths and every recorded score, one panel each, with
the samples kept and removed in two colours and the configured thresholds drawn as lines."""
from __future__ import annotations

import os
from typing import Optional

KEPT_COLOUR, REMOVED_COLOUR, THRESHOLD_COLOUR = "#2e7d32", "#c62828", "black"

SCORE_THRESHOLDS = {
    "caption_words": (("caption_length", "min_words"), ("caption_length", "max_words")),
    "repetition": (("repetition", "max_duplicate_fraction"),),
    "language_probability": (("language", "min_probability"),),
    "aspect_ratio": (("image", "max_aspect_ratio"),),
    "clip_score": (("clip", "min_score"),),
    "judge_vir": (("judge", "min_vir"),),
}
"""score name -> the (config section, field) pairs whose values bound it."""

PROBABILITIES = {"language_probability"}
"""Scores in [0, 1]: their axis always spans 0..1 (a run of 0.999s stays readable)."""


def score_thresholds(cfg) -> dict[str, list[tuple[str, float]]]:
    """The thresholds of the enabled stages, by score: [(label ``field=value``, value)]."""
    out: dict[str, list[tuple[str, float]]] = {}
    for score, fields in SCORE_THRESHOLDS.items():
        for section, name in fields:
            sub = getattr(cfg, section, None)
            value = getattr(sub, name, None)
            if sub is None or not getattr(sub, "enabled", True) or not isinstance(value, (int, float)):
                continue
            out.setdefault(score, []).append((f"{name}={value:g}", float(value)))
    return out


def draw_score_panel(ax, name: str, values: list, kept: Optional[list] = None,
                     thresholds: list[tuple[str, float]] = ()) -> None:
    """One histogram: kept and removed samples stacked in two colours, thresholds as dashed
    lines, plain tick labels (matplotlib's offset notation made 0.9991..0.9999 unreadable)."""
    from matplotlib.ticker import FuncFormatter

    kept = [True] * len(values) if kept is None else kept
    kept_v = [v for v, k in zip(values, kept) if k]
    removed_v = [v for v, k in zip(values, kept) if not k]
    span = (0.0, 1.0) if name in PROBABILITIES else None
    lo, hi = span or ((min(values), max(values)) if values else (0.0, 1.0))
    if not span:  # a threshold far off the data (max_words=400 for 3..50 words) stays a legend entry
        near = [t for _, t in thresholds if lo - (hi - lo) <= t <= hi + (hi - lo)]
        lo, hi = min([lo, *near]), max([hi, *near])
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    if values:
        bins = min(40, max(5, len(set(values))))
        ax.hist([kept_v, removed_v], bins=bins, range=(lo, hi), stacked=True,
                color=[KEPT_COLOUR, REMOVED_COLOUR],
                label=[f"kept ({len(kept_v)})", f"removed ({len(removed_v)})"])
    for label, value in thresholds:
        if lo <= value <= hi:
            ax.axvline(value, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1, label=label)
        else:
            side = "left" if value < lo else "right"
            ax.plot([], [], color=THRESHOLD_COLOUR, linestyle="--", linewidth=1,
                    label=f"{label} ({side} of the axis)")
    ax.set_xlim(lo, hi)
    plain = FuncFormatter(lambda v, _pos: f"{v:.6g}")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.set_title(f"{name} (n={len(values)})")
    ax.set_xlabel("words" if name == "caption_words" else name)
    if values or thresholds:
        ax.legend(fontsize=7)


def plot_histograms(scores: dict, path: str, kept: Optional[dict] = None,
                    thresholds: Optional[dict] = None) -> None:
    """One panel per score (caption_words first); ``kept``: score -> a flag per value (True:
    the sample was kept), ``thresholds``: score_thresholds(cfg). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept, thresholds = kept or {}, thresholds or {}
    names = sorted(scores, key=lambda k: (k != "caption_words", k)) or ["caption_words"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        draw_score_panel(ax, name, scores.get(name, []), kept.get(name), thresholds.get(name, []))
    axes[0][0].set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=80)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
