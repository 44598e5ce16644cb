"""The curation plots tell the truth (issue 22): filter_report.png's panels colour kept and
removed samples, draw the configured thresholds and show plain tick labels; ranking.png's title
names the benchmarks and what the error bars are."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from megatron_sail.curate.ablation_stats import RankRow, plot_ranking, ranking_title  # noqa: E402
from megatron_sail.curate.filters.pipeline import FilterConfig  # noqa: E402
from megatron_sail.curate.filters.report import (  # noqa: E402
    KEPT_COLOUR,
    REMOVED_COLOUR,
    draw_score_panel,
    plot_histograms,
    score_thresholds,
)


def _bar_totals(ax) -> dict[str, float]:
    """Sum of histogram bar heights by colour."""
    totals: dict[str, float] = {}
    for patch in ax.patches:
        c = to_hex(patch.get_facecolor())
        totals[c] = totals.get(c, 0.0) + patch.get_height()
    return totals


def test_language_probability_panel_is_readable_coloured_and_thresholded():
    """0.9991..0.9999 kept, two removed below min_probability: plain 0..1 ticks (no offset
    text), the threshold at 0.5, kept and removed counted in their colours."""
    cfg = FilterConfig()
    thresholds = score_thresholds(cfg)
    assert thresholds["language_probability"] == [("min_probability=0.5", 0.5)]
    values = [0.9991, 0.9995, 0.9999, 0.9993, 0.0, 0.31]
    kept = [True, True, True, True, False, False]
    fig, ax = plt.subplots()
    draw_score_panel(ax, "language_probability", values, kept, thresholds["language_probability"])
    fig.canvas.draw()
    assert ax.xaxis.get_offset_text().get_text() == ""
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(0.0 <= float(t) <= 1.0 for t in labels)
    assert ax.get_xlim() == (0.0, 1.0)
    assert _bar_totals(ax) == {KEPT_COLOUR: 4.0, REMOVED_COLOUR: 2.0}
    assert [tuple(line.get_xdata()) for line in ax.lines] == [(0.5, 0.5)]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == [
        "kept (4)",
        "min_probability=0.5",
        "removed (2)",
    ]
    plt.close(fig)


def test_a_narrow_score_range_keeps_plain_tick_labels():
    """Any score, not only probabilities: 0.12341..0.12345 is not shown as offset + 1e-5."""
    fig, ax = plt.subplots()
    draw_score_panel(ax, "repetition", [0.12341, 0.12342, 0.12345], None, [])
    fig.canvas.draw()
    assert ax.xaxis.get_offset_text().get_text() == ""
    assert all(t.get_text().startswith("0.1234") for t in ax.get_xticklabels() if t.get_text())
    plt.close(fig)


def test_thresholds_follow_the_config_and_skip_disabled_stages(tmp_path):
    cfg = FilterConfig()
    cfg.caption_length.min_words, cfg.caption_length.max_words = 5, 60
    cfg.repetition.enabled = False
    t = score_thresholds(cfg)
    assert t["caption_words"] == [("min_words=5", 5.0), ("max_words=60", 60.0)]
    assert "repetition" not in t and "clip_score" not in t  # repetition off; CLIP off by default
    path = tmp_path / "r.png"
    plot_histograms(
        {"caption_words": [1, 7, 80], "language_probability": [0.999, 0.9995]},
        str(path),
        {"caption_words": [False, True, False], "language_probability": [True, True]},
        t,
    )
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_ranking_title_names_the_benchmarks_and_the_error_bars(tmp_path, monkeypatch):
    title = ranking_title(["pope", "caption"], 0.95, 1000, "tiny, 512 tokens per candidate")
    assert "pope, caption" in title and "95% CI of the difference to the best" in title
    assert "paired bootstrap" in title and "1000 resamples" in title
    shown = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (shown.append(fig), close(fig)))
    rows = [RankRow("recap", 70.0, 0.0, 0.0, 0.0), RankRow("raw", 40.0, -30.0, -35.0, -25.0)]
    plot_ranking(rows, str(tmp_path / "ranking.png"), title)
    assert shown[0].axes[0].get_title() == title
    assert (tmp_path / "ranking.png").read_bytes()[:4] == b"\x89PNG"
