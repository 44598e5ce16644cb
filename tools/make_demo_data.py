#!/usr/bin/env python
"""Generate the demo set (images, LLaVA conversations, captions, held-out split, tokenizer).

  python tools/make_demo_data.py --out demo --samples 2000
Then preprocess it (the tiny recipe's geometry: 32 px tiles, 4 tokens per tile, up to 4 tiles):
  python tools/preprocess_data.py --input demo/train.jsonl --tokenizer demo/tokenizer.json \
      --output-prefix demo/packed/train --seq-length 512 --tile-size 32 --tokens-per-tile 4 --max-tiles 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sail import cli
from megatron_sail.demo.generator import DemoConfig, make_demo  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder to create (must not exist or be empty, unless --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an existing --out folder first (no stale images are left behind)",
    )
    p.add_argument(
        "--samples", type=int, default=2000, metavar="N", help="training samples (default: %(default)s)"
    )
    p.add_argument(
        "--val-samples",
        type=int,
        default=None,
        metavar="N",
        help="held-out samples (default: samples // 10, at least 1)",
    )
    p.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of every random choice (default: %(default)s)"
    )
    p.add_argument(
        "--word-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="fraction of images that show a word to read (default: %(default)s)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=512,
        metavar="N",
        help="size of the demo BPE tokenizer's vocabulary (default: %(default)s)",
    )
    p.add_argument(
        "--pool",
        type=int,
        default=0,
        help="also write an unlabeled pool of this many images with noisy or empty text "
        "(pool.jsonl; exact captions in pool_truth.jsonl), for examples/sail_caption.sh",
    )
    a = p.parse_args(argv)
    if a.samples <= 0:
        p.error("--samples must be positive")
    if os.path.isdir(a.out) and os.listdir(a.out):
        if not a.overwrite:
            p.error(f"--out {a.out} exists and is not empty; give --overwrite to replace it")
        shutil.rmtree(a.out)
    val = a.val_samples if a.val_samples is not None else max(1, a.samples // 10)
    info = make_demo(
        a.out,
        DemoConfig(
            samples=a.samples,
            val_samples=val,
            seed=a.seed,
            word_fraction=a.word_fraction,
            vocab_size=a.vocab_size,
        ),
    )
    if a.pool > 0:
        from megatron_sail.demo.pool import PoolConfig, make_pool

        info.update(make_pool(a.out, PoolConfig(samples=a.pool, seed=a.seed + 4321)))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    cli.run(main)
