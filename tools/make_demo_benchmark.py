#!/usr/bin/env python
"""Write small demo benchmarks in VLMEvalKit's TSV format, on images the demo training set
never shows: demo_pope.tsv (yes/no, POPE form), demo_mcq.tsv (colour/shape/count multiple
choice), demo_ocr.tsv (word reading, OCRBench rule), plus chance.json (guessing baselines:
the better of uniform random guesses and the best constant answer).

  python tools/make_demo_benchmark.py --out demo/bench
  python tools/evaluate.py --checkpoint runs/quickstart/checkpoints \
      --benchmark pope=demo/bench/demo_pope.tsv mcq=demo/bench/demo_mcq.tsv \
      ocrbench=demo/bench/demo_ocr.tsv
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sail import cli
from megatron_sail.demo.benchmarks import DemoBenchConfig, write_caption_benchmark, write_demo_benchmarks  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the TSVs and chance.json")
    p.add_argument("--items", type=int, default=DemoBenchConfig.items, help="questions per set")
    p.add_argument(
        "--seed",
        type=int,
        default=DemoBenchConfig.seed,
        metavar="N",
        help="seed of the generated items (default: %(default)s)",
    )
    p.add_argument(
        "--caption-items",
        type=int,
        default=0,
        help="also write demo_caption.tsv with this many held-out images to caption "
        "(benchmark 'caption', word F1 against the exact captions)",
    )
    a = p.parse_args(argv)
    if a.items < 2:
        p.error("--items must be at least 2")
    info = write_demo_benchmarks(a.out, DemoBenchConfig(items=a.items, seed=a.seed))
    if a.caption_items > 0:
        path = write_caption_benchmark(os.path.join(a.out, "demo_caption.tsv"), a.caption_items, a.seed + 1)
        print(f"caption: {path}")
    for name, v in info.items():
        print(f"{name}: {v['path']} (chance: {v['chance']:.1f})")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    cli.run(main)
