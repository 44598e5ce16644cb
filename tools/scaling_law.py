#!/usr/bin/env python
"""Fit benchmark score = a + b * ln(pretraining tokens) from runs trained with --eval-benchmark.

  python tools/scaling_law.py runs/pretrain_10B runs/pretrain_40B [--budget 655B] [--out scaling]
  python tools/scaling_law.py runs/quickstart          # one run, evaluated during training

Reads every ``benchmarks/NAME`` score and its ``consumed_tokens`` from each run's metrics.jsonl
(folders without one, or without scores, are skipped and named). Fits each benchmark on its own
scale, and the average over benchmarks after normalizing each to 0-100 (OCRBench out of 1,000
items, or out of the items scored; MME out of 2,800). Prints a, b, R^2 (n/a when the scores do
not vary) and the score extrapolated to the budget, capped at the metric's maximum and flagged
``CAPPED`` when the line passes it. Writes ``<out>/scaling.png`` (points and fits, log token
axis) and ``<out>/fits.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sail import cli
from megatron_sail.eval.scaling import fit_all, fit_report, format_r2, parse_tokens, plot, read_points  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders holding metrics.jsonl with benchmark scores (one or more)",
    )
    p.add_argument("--budget", default="655B", help="extrapolate to this many tokens (655B)")
    p.add_argument("--out", default="scaling", help="folder for scaling.png and fits.json")
    a = p.parse_args(argv)
    budget = parse_tokens(a.budget)
    points = read_points(a.runs, log=print)
    if not points.series:
        raise ValueError(
            f"no benchmarks/* scores with consumed_tokens in {', '.join(a.runs)} "
            "(train with --eval-benchmark NAME=PATH)"
        )
    report = fit_report(points, budget)
    for name, why in report.get("no_fit", {}).items():
        print(f"{name}: {why}, no fit")
    for name, f in report.items():
        if name == "no_fit":
            continue
        flag = f" CAPPED at {f['maximum']:g} (line gives {f['at_budget_raw']:.2f})" if f["capped"] else ""
        print(
            f"{name}: a={f['a']:.4f} b={f['b']:.4f} R^2={format_r2(f['r2'])} points={f['points']} "
            f"score@{a.budget}={f['at_budget']:.2f}{flag}"
        )
    os.makedirs(a.out, exist_ok=True)
    png = os.path.join(a.out, "scaling.png")
    plot(points.series, fit_all(points.series), budget, png, points.maxima)
    tmp = os.path.join(a.out, "fits.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=1)
    os.replace(tmp, os.path.join(a.out, "fits.json"))
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    cli.run(main)
