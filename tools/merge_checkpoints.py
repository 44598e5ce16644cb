#!/usr/bin/env python
"""Model soup: average checkpoints of the same shape into one (SAIL-VL2's merge of SFT phases).

    python tools/merge_checkpoints.py --inputs runs/sft_a/checkpoints runs/sft_b/checkpoints \
        [--weights 0.5 0.5] --out ckpt/soup [--overwrite]

Inputs are training checkpoints (run folder or iter_N) or converted ones, saved at any TP/PP.
Different architectures, tensor shapes or tokenizers are refused naming the field, tensor or
tokenizer entry. The output is written under a temporary name and renamed when complete; it
loads with --init-from, megatron_sail.generate and convert_checkpoint.py mcore-to-hf.
Runs in one process (CPU or one GPU), no torchrun. See megatron_sail/posttrain/soup.py.
"""

from __future__ import annotations

import argparse
import time

from megatron_sail import cli
from megatron_sail.posttrain.soup import SoupConfig, merge


def main(argv: list[str] | None = None) -> int:
    """Parse flags, merge, print where the soup went."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--inputs", nargs="+", required=True, help="checkpoint folders (2 or more)")
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        default=None,
        help="one weight per input (normalized to sum 1; default uniform)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    start = time.time()
    out = merge(SoupConfig(args.inputs, args.out, args.weights, args.overwrite))
    print(f"wrote {out} ({len(args.inputs)} inputs) in {time.time() - start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
