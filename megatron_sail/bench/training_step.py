"""Timing of one training step on random weights and synthetic packed rows, shared by tools/benchmark.py
(our trainer) and benchmarks/hf_reference.py (transformers' InternVL): the same batches, the same
timing (warm-up, synchronized wall time per step, a separate hooked pass for the ViT / LM /
optimizer split), the same FLOPs formula (training/flops.py) and the same report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from megatron_sail.training.flops import (
    device_peak_flops,
    mfu,
    shape_from_model_config,
    step_flops,
)
from megatron_sail.training.metrics import Stopwatch, VisionTiming, peak_memory_bytes


def build_parser(doc: str | None = None, hf: bool = False) -> argparse.ArgumentParser:
    """Flags shared by tools/benchmark.py and benchmarks/hf_reference.py (``hf`` drops ours-only
    ones); ``doc`` is the calling tool's description."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="sail_2b", help="tiny, sail_2b or sail_8b")
    p.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="tokens per packed row (default: 4096; tiny: its recipe's)",
    )
    p.add_argument(
        "--tiles-per-row",
        type=int,
        default=4,
        help="one-tile images per row (tiles of the model's image size: 448 px, tiny 32 px)",
    )
    p.add_argument("--samples-per-row", type=int, default=1, help="packed samples per row")
    p.add_argument("--micro-batch-size", type=int, default=1, help="rows per forward pass")
    p.add_argument(
        "--num-micro-batches", type=int, default=1, help="micro-batches per step (gradient accumulation)"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernels)")
    p.add_argument("--split-steps", type=int, default=2, help="extra hooked steps for the time split")
    p.add_argument(
        "--lm-layers",
        type=int,
        default=None,
        help="override the recipe's LM depth (a smaller model of the same widths)",
    )
    p.add_argument("--vit-layers", type=int, default=None, help="override the recipe's ViT depth")
    p.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="seed of the weights and synthetic batches (default: %(default)s)",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    if not hf:
        p.add_argument(
            "--fp8-format", default=None, choices=["hybrid", "e4m3"], help="Transformer Engine FP8 (GPU)"
        )
        p.add_argument(
            "--recompute-granularity",
            default=None,
            choices=["selective", "full"],
            help="activation recomputation of the LM (default: none)",
        )
        p.add_argument("--recompute-vit", action="store_true", help="full recompute of the ViT layers")
    return p


def resolve_run(args: argparse.Namespace):
    """The recipe's RunConfig for one device and the benchmark's shape (stage: all trainable)."""
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.config.recipes import get_recipe
    from megatron_sail.config.run import finalize

    run = get_recipe(args.recipe)("sft-knowledge")
    m = run.model
    if args.lm_layers is not None:
        m = dataclasses.replace(m, language=dataclasses.replace(m.language, num_layers=args.lm_layers))
    if args.vit_layers is not None:
        m = dataclasses.replace(m, vision=dataclasses.replace(m.vision, num_layers=args.vit_layers))
    run = dataclasses.replace(run, model=m)
    if args.seq_length is None:
        args.seq_length = run.data.seq_length if args.recipe == "tiny" else 4096
    run.data.seq_length = args.seq_length
    run = dataclasses.replace(run, parallel=ParallelConfig())
    t = run.train
    t.micro_batch_size = args.micro_batch_size
    t.global_batch_size = args.micro_batch_size * args.num_micro_batches
    t.train_iters = args.warmup + args.steps + args.split_steps + 1
    t.fp8_format = getattr(args, "fp8_format", None)
    t.recompute_granularity = getattr(args, "recompute_granularity", None)
    t.recompute_vit = getattr(args, "recompute_vit", False)
    t.bf16 = torch.cuda.is_available()
    run.optim.lr_warmup_iters = 0
    return finalize(run)


def synthetic_micro_batch(
    model_cfg, seq_length: int, rows: int, tiles_per_row: int, samples_per_row: int, gen: torch.Generator
):
    """A MicroBatch of ``rows`` packed rows with random text and one-tile random-pixel images.

    Samples split the row evenly; tiles go to samples round-robin and sit right after each
    sample's first token. Every non-image position but a sample's last is trained on.
    """
    from megatron_sail.data.loading.collate import MicroBatch

    tpt = model_cfg.tokens_per_tile()
    vocab, img = model_cfg.language.vocab_size, model_cfg.img_context_token_id
    bounds = np.linspace(0, seq_length, samples_per_row + 1).astype(np.int64)
    per_sample = [
        tiles_per_row // samples_per_row + (k < tiles_per_row % samples_per_row)
        for k in range(samples_per_row)
    ]
    for k, n in enumerate(per_sample):
        if bounds[k + 1] - bounds[k] < n * tpt + 2:
            raise ValueError(
                f"--seq-length {seq_length}: sample {k} of {bounds[k + 1] - bounds[k]} "
                f"tokens cannot hold {n} tiles of {tpt} tokens plus text"
            )
    tokens = torch.randint(0, vocab - 1, (rows, seq_length), generator=gen)
    tokens[tokens == img] = 0
    loss_mask = torch.ones(rows, seq_length)
    for k in range(samples_per_row):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        tokens[:, lo + 1 : lo + 1 + per_sample[k] * tpt] = img
        loss_mask[:, lo : lo + 1 + per_sample[k] * tpt] = 0.0
        loss_mask[:, hi - 1] = 0.0
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    labels[:, bounds[1:] - 1] = 0
    cu = np.concatenate([bounds[:-1] + r * seq_length for r in range(rows)] + [[rows * seq_length]])
    side = model_cfg.vision.image_size
    n_tiles = rows * tiles_per_row
    return MicroBatch(
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_seqlen=int(np.diff(bounds).max()),
        tiles=torch.randn(n_tiles, 3, side, side, generator=gen),
        num_images=n_tiles,
        num_tiles=n_tiles,
        decode_failures=0,
        failed_sources=[],
    )


def batch_flops(shape, batch, samples_per_row: int) -> float:
    """Model FLOPs of one synthetic micro-batch (all its segments are real samples)."""
    lens = torch.diff(batch.cu_seqlens.long()).tolist()
    assert len(lens) == batch.tokens.shape[0] * samples_per_row
    return step_flops(shape, lens, batch.num_tiles)


@dataclass
class Result:
    """What one benchmark run measured."""

    name: str
    recipe: str
    device: str
    seq_length: int
    tiles_per_row: int
    samples_per_row: int
    micro_batch_size: int
    num_micro_batches: int
    steps: int
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float | None
    peak_memory_gib: float
    flops_per_step: float
    losses: list[float]
    split_s: dict[str, float] = field(default_factory=dict)
    fp8_format: str | None = None
    recompute_granularity: str | None = None


def _sync() -> None:
    """Wait for queued device work (no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    """The GPU's name, or the CPU's core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def measure(runner, run, args, name: str) -> Result:
    """Warm up, time ``args.steps`` steps, then a hooked pass for the split; returns the Result.

    ``runner`` provides inputs(batch), train_step(inputs_list, stopwatch) -> loss,
    vision / projector modules and peak_memory(); the same function times both tools.
    """
    gen = torch.Generator().manual_seed(args.seed)
    pool = [
        [
            synthetic_micro_batch(
                run.model,
                args.seq_length,
                args.micro_batch_size,
                args.tiles_per_row,
                args.samples_per_row,
                gen,
            )
            for _ in range(args.num_micro_batches)
        ]
        for _ in range(2)
    ]
    shape = shape_from_model_config(run.model)
    flops = sum(batch_flops(shape, b, args.samples_per_row) for b in pool[0])
    tokens = args.seq_length * args.micro_batch_size * args.num_micro_batches
    plain = Stopwatch()
    losses = []
    for i in range(args.warmup):
        runner.train_step([runner.inputs(b) for b in pool[i % 2]], plain)
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        losses.append(runner.train_step([runner.inputs(b) for b in pool[i % 2]], plain))
    _sync()
    step_time = (time.perf_counter() - start) / max(args.steps, 1)
    split = _split(runner, pool, args.split_steps)
    peak = device_peak_flops()
    per_gpu = flops / step_time
    ratio = mfu(per_gpu, peak)
    return Result(
        name=name,
        recipe=args.recipe,
        device=device_name(),
        seq_length=args.seq_length,
        tiles_per_row=args.tiles_per_row,
        samples_per_row=args.samples_per_row,
        micro_batch_size=args.micro_batch_size,
        num_micro_batches=args.num_micro_batches,
        steps=args.steps,
        step_time_s=step_time,
        tokens_per_s=tokens / step_time,
        tflops_per_gpu=per_gpu / 1e12,
        mfu=None if math.isnan(ratio) else ratio,
        peak_memory_gib=runner.peak_memory() / 2**30,
        flops_per_step=flops,
        losses=[float(x) for x in losses],
        split_s=split,
        fp8_format=getattr(args, "fp8_format", None),
        recompute_granularity=getattr(args, "recompute_granularity", None),
    )


def _split(runner, pool, steps: int) -> dict[str, float]:
    """Mean seconds per step of ViT + projector, LM forward/backward, optimizer and data wait."""
    if steps <= 0:
        return {}
    sw = Stopwatch(sync=_sync)
    timing = VisionTiming(runner.vision, runner.projector, sw)
    try:
        for i in range(steps):
            with sw.section("step"):
                with sw.section("data"):
                    inputs = [runner.inputs(b) for b in pool[i % 2]]
                runner.train_step(inputs, sw)
    finally:
        timing.remove()
    t = {k: v / steps for k, v in sw.reset().items()}
    vit = t.get("vit_fwd", 0.0) + t.get("vit_bwd", 0.0)
    return {
        "vit_projector_s": vit,
        "lm_fwd_bwd_s": t.get("fwd_bwd", 0.0) - vit,
        "optimizer_s": t.get("optimizer", 0.0),
        "data_wait_s": t.get("data", 0.0),
        "step_s": t.get("step", 0.0),
    }


def report(r: Result, json_path: str | None) -> None:
    """Print the summary (its last lines are the numbers issue 6 asks for) and write the JSON."""
    print(
        f"{r.name} | {r.recipe} | {r.device} | seq {r.seq_length} x mbs {r.micro_batch_size} "
        f"x {r.num_micro_batches} micro-batches | {r.tiles_per_row} tiles/row | "
        f"{r.samples_per_row} samples/row | fp8 {r.fp8_format} | recompute {r.recompute_granularity}"
    )
    print(f"losses: {' '.join(f'{x:.4f}' for x in r.losses)}")
    print(f"step time: {r.step_time_s:.4f} s ({r.steps} steps)")
    print(f"tokens/s: {r.tokens_per_s:.1f}")
    print(f"TFLOP/s per GPU: {r.tflops_per_gpu:.3f}")
    mfu_text = f"{r.mfu:.4f}" if r.mfu is not None else "n/a (no dense bf16 peak known for this device)"
    print(f"MFU: {mfu_text}")
    print(f"peak memory: {r.peak_memory_gib:.2f} GiB")
    s = r.split_s
    if s:
        print(
            f"step split: vit+projector {s['vit_projector_s']:.4f} s | lm fwd/bwd {s['lm_fwd_bwd_s']:.4f} s "
            f"| optimizer {s['optimizer_s']:.4f} s | data wait {s['data_wait_s']:.4f} s "
            f"| step {s['step_s']:.4f} s (hooked, synchronized)"
        )
    if json_path:
        tmp = f"{json_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(r), f, indent=2)
        os.replace(tmp, json_path)
    sys.stdout.flush()


class OurRunner:
    """Our model, DDP, optimizer and scheduler, built by megatron_sail.train's own functions."""

    def __init__(self, run):
        from megatron_sail import train as trainer
        from megatron_sail.models.sail_vl import unwrap
        from megatron_sail.platform import distributed as platform
        from megatron_sail.training.optimizer import build_optimizer, build_scheduler

        dtype = trainer.check_precision(run)
        platform.initialize(run.parallel, run.train.seed)
        self.run = run
        self.device = platform.device()
        self.chunks = trainer.wrap_ddp(run, trainer.build_chunks(run, dtype))
        self.optimizer = build_optimizer(run.optim, self.chunks, bf16=dtype == torch.bfloat16)
        self.scheduler = build_scheduler(run.optim, self.optimizer)
        trainer.hook_model_config(self.chunks, self.optimizer)
        model = unwrap(self.chunks[0])
        self.vision, self.projector = model.vision_model, model.projector
        self.row_stats = (0.0, 0.0)

    def inputs(self, batch):
        """The micro-batch on the model's device (the trainer's own copy then does nothing)."""
        return batch.to(self.device, non_blocking=True)

    def train_step(self, batches: list, sw: Stopwatch) -> float:
        """training.step.train_step; 'fwd_bwd' ends where the optimizer starts preparing grads."""
        from megatron_sail.training.step import train_step

        marks = {}
        prepare = self.optimizer.prepare_grads

        def timed_prepare():
            marks["opt"] = sw.now()
            return prepare()

        start = sw.now()
        self.optimizer.prepare_grads = timed_prepare
        try:
            res = train_step(
                self.chunks, self.optimizer, self.scheduler, batches, self.run.data.seq_length, self.row_stats
            )
        finally:
            del self.optimizer.prepare_grads
        end = sw.now()
        sw.add("fwd_bwd", marks["opt"] - start)
        sw.add("optimizer", end - marks["opt"])
        return res.loss

    def peak_memory(self) -> int:
        """Peak memory of the run so far."""
        return peak_memory_bytes()
