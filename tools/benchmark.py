#!/usr/bin/env python
"""Training-step speed of OUR trainer on random weights and synthetic packed rows (issue 6).

    python tools/benchmark.py --recipe sail_2b [--seq-length 4096] [--tiles-per-row 4] [--steps N]
        [--micro-batch-size B] [--fp8-format hybrid|e4m3] [--recompute-granularity selective|full]
        [--json FILE]
    python tools/benchmark.py --recipe tiny --steps 2          # runs on the CPU

Builds the recipe's model, Megatron-Core DDP and optimizer exactly as ``megatron_sail.train``
does, and times ``training.step.train_step`` (the trainer's own step) on synthetic rows: no
dataset needed. Each row holds ``--samples-per-row`` samples (default 1) and ``--tiles-per-row``
one-tile images of random pixels. Timing: ``--warmup`` steps, then ``--steps`` steps timed with
the device synchronized at each step boundary (the headline numbers), then ``--split-steps``
more with hooks that synchronize inside the step to split its time into ViT + projector,
LM forward/backward, optimizer and data wait (the host-to-device copy: batches are synthetic).
The last lines printed are tokens/s, TFLOP/s per GPU, MFU, peak memory and that split; the same
numbers go to ``--json FILE``. FLOPs follow training/flops.py, as in benchmarks/hf_reference.py.
"""

from __future__ import annotations

import torch

from megatron_sail import cli
from megatron_sail.bench.training_step import (
    OurRunner,
    batch_flops,
    build_parser,
    measure,
    report,
    resolve_run,
    synthetic_micro_batch,
)
from megatron_sail.training.flops import shape_from_model_config


def main(argv: list[str] | None = None) -> int:
    """Build our trainer's pieces for the recipe, time them, print and save the results."""
    args = build_parser(__doc__).parse_args(argv)
    run = resolve_run(args)
    runner = OurRunner(run)
    shape = shape_from_model_config(run.model)
    gen = torch.Generator().manual_seed(args.seed)
    probe = synthetic_micro_batch(
        run.model, args.seq_length, args.micro_batch_size, args.tiles_per_row, args.samples_per_row, gen
    )
    runner.row_stats = (
        float(args.seq_length * args.micro_batch_size * args.num_micro_batches),
        batch_flops(shape, probe, args.samples_per_row) * args.num_micro_batches,
    )
    result = measure(runner, run, args, name="megatron_sail")
    report(result, args.json)
    from megatron_sail.platform import distributed as platform

    platform.shutdown()
    return 0


if __name__ == "__main__":
    cli.run(main)
