#!/usr/bin/env python
"""Fit benchmark score = a + b * ln(pretraining tokens) from runs trained with --eval-benchmark.

  python tools/scaling_law.py runs/pretrain_10B runs/pretrain_40B [--budget 655B] [--out scaling]

Reads every ``benchmarks/NAME`` score and its ``consumed_tokens`` from each run's metrics.jsonl,
fits each benchmark and the average over benchmarks, prints a, b, R^2 and the score extrapolated
to the budget, and writes ``<out>/scaling.png`` (points and fits, log token axis) and
``<out>/fits.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sail.eval.scaling import fit_all, parse_tokens, plot, read_points  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--budget", default="655B", help="extrapolate to this many tokens (655B)")
    p.add_argument("--out", default="scaling", help="folder for scaling.png and fits.json")
    a = p.parse_args(argv)
    budget = parse_tokens(a.budget)
    points = read_points(a.runs)
    if not points:
        sys.exit(f"no benchmarks/* scores with consumed_tokens in {', '.join(a.runs)} "
                 "(train with --eval-benchmark NAME=PATH)")
    fits = fit_all(points)
    os.makedirs(a.out, exist_ok=True)
    out = {}
    for name in sorted(points):
        if name not in fits:
            print(f"{name}: {len(points[name])} point(s) at one token count, no fit")
            continue
        f = fits[name]
        at = f.predict(budget)
        out[name] = {**dataclasses.asdict(f), "budget_tokens": budget, "at_budget": at}
        print(f"{name}: a={f.a:.4f} b={f.b:.4f} R^2={f.r2:.4f} points={f.points} "
              f"score@{a.budget}={at:.2f}")
    png = os.path.join(a.out, "scaling.png")
    plot(points, fits, budget, png)
    tmp = os.path.join(a.out, "fits.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(tmp, os.path.join(a.out, "fits.json"))
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
