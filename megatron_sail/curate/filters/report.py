"""The run report of filter_data, merged from the per-shard reports of every finished shard:
``filter_report.json`` (counts, removals by stage and reason, score summaries, config),
``filter_report.png`` (one histogram per score with the kept and removed samples in two colours
and the configured thresholds drawn as lines, then a row of thumbnails of removed samples per
reason) and ``filter_report.html`` (counts and the same thumbnails with their details)."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
from typing import Optional

from megatron_sail.curate.writer import DONE_DIR, write_atomic

KEPT_COLOUR, REMOVED_COLOUR, THRESHOLD_COLOUR = "#2e7d32", "#c62828", "black"

REPORTS = "reports"
"""Folder of the per-shard reports, under the output folder."""
SCORE_THRESHOLDS = {
    "caption_words": (("caption_length", "min_words"), ("caption_length", "max_words")),
    "repetition": (("repetition", "max_duplicate_fraction"),),
    "language_probability": (("language", "min_probability"),),
    "aspect_ratio": (("image", "max_aspect_ratio"),),
    "clip_score": (("clip", "min_score"),),
    "judge_vir": (("judge", "min_vir"),),
}
"""score name -> the (config section, field) pairs whose values bound it."""

REPORT_JSON, REPORT_PNG, REPORT_HTML = "filter_report.json", "filter_report.png", "filter_report.html"
THUMBNAILS = 4

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


def draw_score_panel(
    ax, name: str, values: list, kept: Optional[list] = None, thresholds: list[tuple[str, float]] = ()
) -> None:
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
        ax.hist(
            [kept_v, removed_v],
            bins=bins,
            range=(lo, hi),
            stacked=True,
            color=[KEPT_COLOUR, REMOVED_COLOUR],
            label=[f"kept ({len(kept_v)})", f"removed ({len(removed_v)})"],
        )
    for label, value in thresholds:
        if lo <= value <= hi:
            ax.axvline(value, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1, label=label)
        else:
            side = "left" if value < lo else "right"
            ax.plot(
                [],
                [],
                color=THRESHOLD_COLOUR,
                linestyle="--",
                linewidth=1,
                label=f"{label} ({side} of the axis)",
            )
    ax.set_xlim(lo, hi)
    plain = FuncFormatter(lambda v, _pos: f"{v:.6g}")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.set_title(f"{name} (n={len(values)})")
    ax.set_xlabel("words" if name == "caption_words" else name)
    if values or thresholds:
        ax.legend(fontsize=7)


def plot_histograms(
    scores: dict, path: str, kept: Optional[dict] = None, thresholds: Optional[dict] = None
) -> None:
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


def merge_reports(out_dir: str) -> dict:
    """Sum the per-shard reports of the finished shards (shard-name order: deterministic)."""
    done = os.path.join(out_dir, DONE_DIR)
    names = sorted(f[:-5] for f in os.listdir(done) if f.endswith(".json")) if os.path.isdir(done) else []
    merged = {
        "shards": {},
        "samples": 0,
        "kept": 0,
        "removed_by_stage": {},
        "scores": {},
        "score_kept": {},
        "stage_seconds": {},
        "thumbnails": {},
        "worker_seconds": 0.0,
    }
    for name in names:
        rp = os.path.join(out_dir, REPORTS, name + ".json")
        if not (os.path.isfile(rp) and os.path.isfile(os.path.join(out_dir, name + ".tar"))):
            continue
        with open(os.path.join(done, name + ".json"), encoding="utf-8") as f:
            marker = json.load(f)
        with open(rp, encoding="utf-8") as f:
            shard = json.load(f)
        merged["shards"][name] = marker["kept"]
        merged["samples"] += marker["samples"]
        merged["kept"] += marker["kept"]
        merged["worker_seconds"] += marker.get("seconds", 0.0)
        for stage, reasons in shard["removed"].items():
            into = merged["removed_by_stage"].setdefault(stage, {})
            for r, n in reasons.items():
                into[r] = into.get(r, 0) + n
        for k, v in shard["scores"].items():
            merged["scores"].setdefault(k, []).extend(v)
            merged["score_kept"].setdefault(k, []).extend(shard["score_kept"][k])
        for k, v in shard["stage_seconds"].items():
            merged["stage_seconds"][k] = merged["stage_seconds"].get(k, 0.0) + v
        for reason, thumbs in shard["thumbnails"].items():
            into = merged["thumbnails"].setdefault(reason, [])
            into.extend(thumbs[: THUMBNAILS - len(into)])
    return merged


def write_run_report(out_dir: str, cfg) -> str:
    """filter_report.json/.png/.html of the whole output folder; returns the JSON's path."""
    m = merge_reports(out_dir)
    by_reason: dict = {}
    for reasons in m["removed_by_stage"].values():
        for r, n in reasons.items():
            by_reason[r] = by_reason.get(r, 0) + n
    summary = {
        k: {"n": len(v), "min": min(v), "mean": sum(v) / len(v), "max": max(v)}
        for k, v in sorted(m["scores"].items())
        if v
    }
    secs = m["worker_seconds"]
    report = {
        "samples": m["samples"],
        "kept": m["kept"],
        "removed": m["samples"] - m["kept"],
        "removed_by_reason": dict(sorted(by_reason.items())),
        "removed_by_stage": {k: dict(sorted(v.items())) for k, v in m["removed_by_stage"].items()},
        "shards": m["shards"],
        "scores": summary,
        "worker_seconds": round(secs, 3),
        "stage_seconds": {k: round(v, 3) for k, v in m["stage_seconds"].items()},
        "images_per_s": round(m["samples"] / secs, 2) if secs > 0 else None,
        "rejects": "NAME.rejects.jsonl per shard",
        "histogram": REPORT_PNG,
        "html": REPORT_HTML,
        "thumbnails": {r: [t["where"] for t in ts] for r, ts in sorted(m["thumbnails"].items())},
        "config": dataclasses.asdict(cfg),
    }
    path = os.path.join(out_dir, REPORT_JSON)
    write_atomic(path, json.dumps(report, indent=1).encode())
    plot_report(
        m["scores"],
        m["score_kept"],
        score_thresholds(cfg),
        m["thumbnails"],
        os.path.join(out_dir, REPORT_PNG),
    )
    write_atomic(os.path.join(out_dir, REPORT_HTML), html_report(report, m["thumbnails"]).encode())
    return path


def plot_report(scores: dict, kept: dict, thresholds: dict, thumbnails: dict, path: str) -> None:
    """The score panels (draw_score_panel: kept/removed colours, thresholds; caption_words
    first), then one row per removal reason with its thumbnails. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    names = sorted(scores, key=lambda k: (k != "caption_words", k)) or ["caption_words"]
    reasons = sorted(thumbnails)
    cols = max(len(names), THUMBNAILS)
    fig, axes = plt.subplots(
        1 + len(reasons), cols, figsize=(4 * cols, 3.2 + 2.6 * len(reasons)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes[0], names):
        ax.axis("on")
        draw_score_panel(ax, name, scores.get(name, []), kept.get(name), thresholds.get(name, []))
    axes[0][0].set_ylabel("samples")
    for row, reason in enumerate(reasons, start=1):
        for col, t in enumerate(thumbnails[reason][:cols]):
            ax = axes[row][col]
            if t.get("jpeg"):
                ax.imshow(Image.open(io.BytesIO(base64.b64decode(t["jpeg"]))))
            ax.set_title(f"removed: {reason}\n{t['where'][-32:]}", fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"  # array tasks may write the run report at the same time
    fig.savefig(tmp, dpi=72)
    plt.close(fig)
    os.replace(tmp, path)


def html_report(report: dict, thumbnails: dict) -> str:
    """A self-contained page: counts by stage and reason, thumbnails of removed samples."""
    rows = "".join(
        f"<tr><td>{html.escape(s)}</td><td>{html.escape(r)}</td><td>{n}</td></tr>"
        for s, rs in report["removed_by_stage"].items()
        for r, n in rs.items()
    )
    parts = [
        "<html><head><meta charset='utf-8'><title>filter report</title></head><body>",
        f"<h1>filter report</h1><p>{report['samples']} samples, kept {report['kept']}, "
        f"removed {report['removed']}</p><table border=1><tr><th>stage</th><th>reason</th><th>removed</th></tr>"
        f"{rows}</table>",
    ]
    for reason in sorted(thumbnails):
        parts.append(f"<h2>{html.escape(reason)}</h2><div>")
        for t in thumbnails[reason]:
            img = f"<img src='data:image/jpeg;base64,{t['jpeg']}'>" if t.get("jpeg") else "(no image)"
            parts.append(
                f"<figure style='display:inline-block'>{img}<figcaption>{html.escape(t['where'])}<br>"
                f"{html.escape(t['detail'])}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)
