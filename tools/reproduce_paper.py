#!/usr/bin/env python
"""SAIL-VL's claims at toy scale (examples/reproduce_paper.sh; docs/sft_curriculum.md):
(a) score against pretraining tokens with a log-linear fit, (b) score against SFT quantity,
(c) ascending-complexity curriculum vs one-stage vs descending, seeds and paired-bootstrap CIs,
(d) recaptioned vs original captions. Writes OUT/report.md, OUT/report.json and PNG figures.

  python tools/reproduce_paper.py --out runs/paper [--smoke] [--seeds 1 2] [--method heuristic|ifd]
      [--caption-summary runs/sail_caption/summary.json | --run-caption]

A rerun resumes: finished data, datasets and training runs are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sail import cli  # noqa: E402

SMOKE = {
    "pretrain_samples": 300,
    "sft_per_level": 120,
    "bench_items": 20,
    "pretrain_iters": 64,
    "eval_points": 6,
    "sft_epochs": 1.0,
    "seeds": [1],
    "resamples": 200,
    "replay": 0.0,
}
"""The smoke study: every part, a few samples and steps (minutes; numbers not meaningful)."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default="runs/paper", metavar="DIR", help="study folder; a rerun resumes (runs/paper)"
    )
    p.add_argument("--smoke", action="store_true", help="a few samples and steps per part (SMOKE above)")
    p.add_argument(
        "--pretrain-samples", type=int, metavar="N", help="demo pretraining conversations (4000; smoke 300)"
    )
    p.add_argument(
        "--sft-per-level", type=int, metavar="N", help="graded SFT pool samples per level (1200; smoke 120)"
    )
    p.add_argument("--bench-items", type=int, metavar="N", help="items per benchmark set (100; smoke 20)")
    p.add_argument(
        "--pretrain-iters", type=int, metavar="N", help="steps of the pretraining run (1024; smoke 64)"
    )
    p.add_argument(
        "--eval-points",
        type=int,
        metavar="N",
        help="in-training evaluations of the pretraining run at iters/2^k (7: 1.8 decades; smoke 6)",
    )
    p.add_argument(
        "--sft-epochs", type=float, metavar="E", help="epochs of every SFT run over its data (6; smoke 1)"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", metavar="S", help="seeds of every curriculum arm (1 2; smoke 1)"
    )
    p.add_argument(
        "--replay",
        type=float,
        metavar="F",
        help="replay fraction of the ascending_replay arm, 0: no such arm (0.5; smoke 0)",
    )
    p.add_argument("--resamples", type=int, metavar="N", help="paired-bootstrap resamples (1000; smoke 200)")
    p.add_argument(
        "--method",
        default="heuristic",
        choices=["heuristic", "ifd"],
        help="complexity score of the pool (heuristic; ifd uses the pretrained checkpoint)",
    )
    p.add_argument(
        "--caption-summary",
        default=None,
        metavar="FILE",
        help="examples/sail_caption.sh's summary.json for claim 1 (none)",
    )
    p.add_argument(
        "--run-caption",
        action="store_true",
        help="run examples/sail_caption.sh into OUT/sail_caption when no summary (off)",
    )
    a = p.parse_args(argv)
    from megatron_sail.demo.paper_data import StudyData
    from megatron_sail.demo.paper_study import StudyConfig, run_study

    chosen = dict(SMOKE) if a.smoke else {}
    for k in (
        "pretrain_samples",
        "sft_per_level",
        "bench_items",
        "pretrain_iters",
        "eval_points",
        "sft_epochs",
        "seeds",
        "resamples",
        "replay",
    ):
        if getattr(a, k) is not None:
            chosen[k] = getattr(a, k)
    data = StudyData(
        **{k: chosen.pop(k) for k in ("pretrain_samples", "sft_per_level", "bench_items") if k in chosen}
    )
    if "seeds" in chosen:
        chosen["seeds"] = tuple(chosen["seeds"])
    cfg = StudyConfig(
        a.out,
        data,
        method=a.method,
        caption_summary=a.caption_summary,
        run_caption=a.run_caption,
        caption_smoke=a.smoke,
        **chosen,
    )
    result = run_study(cfg)
    print(json.dumps({k: result[k] for k in ("scaling", "sft_quantity", "curriculum")}, indent=1))
    print(f"report: {os.path.join(a.out, 'report.md')} and report.json")
    return 0


if __name__ == "__main__":
    cli.run(main)
