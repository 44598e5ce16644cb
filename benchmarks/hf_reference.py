#!/usr/bin/env python
"""The transformers reference for issue 6: time InternVLForConditionalGeneration's training step.

Same work as ``tools/benchmark.py`` (the same synthetic packed micro-batches, built by the same
function), same timing (warm-up steps, then synchronized wall time per step, then a separate
hooked pass for the ViT / LM / optimizer split) and the same FLOPs formula, so the two tools'
numbers compare directly:

    python benchmarks/hf_reference.py --recipe sail_2b --seq-length 4096 --tiles-per-row 4 --steps 20
    python tools/benchmark.py         --recipe sail_2b --seq-length 4096 --tiles-per-row 4 --steps 20

Random weights from the recipe's shape; on a GPU bf16 weights, SDPA attention and fused AdamW
(the setup of issue 6's baseline), on the CPU fp32 and foreach AdamW. Rows packing several
samples (--samples-per-row > 1) pass restarting position_ids (derived from cu_seqlens: our
batches carry none), from which transformers builds a block-causal mask (it materializes that
mask; the one-sample default uses the causal kernel).
"""

from __future__ import annotations

import sys

import torch

from megatron_sail.bench import training_step as bench  # shared with tools/benchmark.py
from megatron_sail.bench.hf_reference import HFRunner


def main(argv: list[str] | None = None) -> int:
    args = bench.build_parser(__doc__, hf=True).parse_args(argv)
    run = bench.resolve_run(args)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runner = HFRunner(run.model, dev, args.seed)
    result = bench.measure(runner, run, args, name="transformers InternVL")
    bench.report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
