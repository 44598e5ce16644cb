"""The training loop: feed global batches, step, log, validate, save, and stop cleanly.

Data order is a pure function of ``consumed_samples``: global batch k holds rows
[k*G, (k+1)*G) of the endless blended stream (data/loading/dataset.py); data-parallel rank r
takes the rows training/balance.py assigns it by modelled FLOPs (the r-th contiguous slice
with --no-balance-dp), in stream order, cut into micro-batches. A resumed run therefore
continues with exactly the global batches the uninterrupted run would have used, at any DP
size, and the loader's position is derived from the TrainState rather than stored separately.

With --async-save a checkpoint is finalized (renamed, `latest` moved, old ones pruned) at the
first step boundary after every rank has written it, and at the latest before the next save and
before ``run`` returns, on every exit path that returns (end, --exit-interval, signals, NaN stop).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_sail.checkpoint.dcp import ThreadAsyncCallsQueue
from megatron_sail.data.loading.prefetch import PrefetchLoader
from megatron_sail.training import balance
from megatron_sail.training import checkpoint as ckpt
from megatron_sail.training.flops import real_seqlens, step_flops
from megatron_sail.training.metrics import StepStats
from megatron_sail.training.moe_metrics import step_moe_losses
from megatron_sail.training.optimizer import group_lrs
from megatron_sail.training.step import eval_step, train_step


@dataclass
class BatchPlan:
    """How a global batch splits over data-parallel ranks and micro-batches."""

    global_batch_size: int
    """Rows per optimizer step."""
    micro_batch_size: int
    """Rows per forward pass."""
    dp_size: int
    """Data-parallel ranks."""
    dp_rank: int
    """This rank's data-parallel index."""
    row_cost: Optional[Callable[[int], float]] = None
    """Modelled FLOPs of stream row k: when given, the rows of each global batch are assigned to
    ranks by training/balance.py instead of in contiguous slices."""

    def __post_init__(self):
        if self.global_batch_size % (self.micro_batch_size * self.dp_size):
            raise ValueError(
                f"--global-batch-size {self.global_batch_size} must be a multiple of "
                f"micro-batch size x DP size = {self.micro_batch_size * self.dp_size}"
            )
        self._mine: tuple[int, list[int]] = (-1, [])

    @property
    def num_microbatches(self) -> int:
        """Micro-batches each rank runs per step."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def microbatch_indices(self, step: int) -> list[list[int]]:
        """Global row indices of this rank's micro-batches in global batch ``step``."""
        return [self.microbatch(step, m) for m in range(self.num_microbatches)]

    def microbatch(self, step: int, m: int) -> list[int]:
        """Global row indices of micro-batch ``m`` of this rank in global batch ``step`` (O(rows
        of the micro-batch): the loader asks for one at a time)."""
        if self.row_cost is None or self.dp_size == 1:
            start = step * self.global_batch_size + self.dp_rank * (self.global_batch_size // self.dp_size)
            return list(range(start + m * self.micro_batch_size, start + (m + 1) * self.micro_batch_size))
        return self.rank_rows(step)[m * self.micro_batch_size : (m + 1) * self.micro_batch_size]

    def rank_rows(self, step: int) -> list[int]:
        """This rank's rows of global batch ``step`` under balancing, in stream order (the last
        step's answer is kept: the loader asks once per micro-batch)."""
        if self._mine[0] != step:
            first = step * self.global_batch_size
            costs = [self.row_cost(first + i) for i in range(self.global_batch_size)]
            ranks = balance.assign(costs, self.dp_size, self.global_batch_size // self.dp_size)
            self._mine = (step, [first + i for i in ranks[self.dp_rank]])
        return self._mine[1]


class SkipDecode:
    """Stands in for the image pipeline on pipeline stages after the first: only the first
    stage runs the ViT, so later stages collate tokens without decoding (empty tiles, every
    image "ok"); step.share_first_stage_images then hands them the first stage's loss mask and
    image counts."""

    def tiles(self, records) -> tuple[torch.Tensor, list[bool]]:
        """No tiles, no failures."""
        return torch.zeros(0, 3, 1, 1), [True] * len(records)


class StepFeeder:
    """Micro-batches of consecutive steps, decoded ahead by the PrefetchLoader, each carrying its
    rows' statistics (real tokens, FLOPs) that collation does not keep."""

    def __init__(
        self,
        dataset,
        plan: BatchPlan,
        pipeline,
        first_step: int,
        flops_shape,
        depth: int = 2,
        decode: bool = True,
        pin_memory: bool = False,
    ):
        self.dataset, self.plan, self.flops_shape = dataset, plan, flops_shape
        # per-dataset loss names: only a blend of several prefixes has them
        names = dataset.source_names() if hasattr(dataset, "source_names") else []
        self.source_names = names if len(names) > 1 else []
        first_mb = first_step * plan.num_microbatches
        meta = dataset.tokenizer_meta  # checks that every row's tiles match its <IMG_CONTEXT> runs
        self.loader = PrefetchLoader(
            self._rows_from,
            pipeline if decode else SkipDecode(),
            depth=depth,
            position=first_mb,
            pin_memory=pin_memory,
            image_token_id=meta.img_context_id,
            tokens_per_tile=meta.tokens_per_tile,
            row_stats=self._row_stats,
        )

    def _rows_from(self, position: int):
        """Row lists from micro-batch ``position`` on (runs in the loader's thread)."""
        n = self.plan.num_microbatches
        for mb in itertools.count(position):
            idx = self.plan.microbatch(mb // n, mb % n)
            yield [self.dataset[i] for i in idx]  # the blended stream is endless: any index

    def _row_stats(self, rows) -> tuple[float, float]:
        """Real (non-padding) tokens and model FLOPs of some rows."""
        lens = [n for r in rows for n in real_seqlens(r.cu_seqlens, r.num_samples)]
        tiles = sum(img.num_tiles for r in rows for img in r.images)
        flops = step_flops(self.flops_shape, lens, tiles) if self.flops_shape else 0.0
        return float(sum(lens)), flops

    def next_step(self) -> tuple[list, tuple[float, float]]:
        """This rank's micro-batches of the next step and their summed row stats."""
        batches = [next(self.loader) for _ in range(self.plan.num_microbatches)]
        return batches, (sum(b.real_tokens for b in batches), sum(b.flops for b in batches))

    def close(self) -> None:
        """Stop the prefetch thread."""
        self.loader.close()


def validate(chunks, valid_feeder_factory: Callable, eval_iters: int, seq_length: int) -> float:
    """Loss over the first ``eval_iters`` global batches of the held-out set (same rows each
    time, so validation losses are comparable across the run)."""
    feeder = valid_feeder_factory()
    try:
        sums = np.zeros(2)
        for _ in range(eval_iters):
            batches, _ = feeder.next_step()
            res = eval_step(chunks, batches, seq_length)
            sums += (res.counters["loss_sum"], res.counters["loss_tokens"])
        return float(sums[0] / max(sums[1], 1.0))
    finally:
        feeder.close()


@dataclass
class LoopContext:
    """What the loop needs, built by train.py."""

    cfg: object
    """The resolved RunConfig."""
    chunks: list
    """DDP-wrapped model chunks of this rank."""
    optimizer: object
    """Megatron optimizer."""
    scheduler: object
    """OptimizerParamScheduler."""
    state: ckpt.TrainState
    """Step counters, restored on resume."""
    feeder: StepFeeder
    """Training micro-batches."""
    metrics: object
    """MetricsWriter."""
    watcher: object
    """ExitWatcher (signals and time limit)."""
    valid_feeder_factory: Optional[Callable] = None
    """Builds a fresh feeder over the held-out set (None: no validation)."""
    config_dict: Optional[dict] = None
    """Resolved config stored with each checkpoint."""
    pending: Optional[ThreadAsyncCallsQueue] = None
    """Checkpoints still being written in the background (--async-save; set by run())."""
    benchmarks: Optional[object] = None
    """eval.hook.BenchmarkHook scoring --eval-benchmark sets on the live model, or None."""
    image_logger: Optional[Callable] = None
    """(iteration, micro-batch) -> writes sample images at log steps (--log-images), or None."""


def save(ctx: LoopContext) -> None:
    """Save a checkpoint of the current state when --save is set."""
    c = ctx.cfg.checkpoint
    ctx.state.scheduler = ctx.scheduler.state_dict()
    ctx.state.data = {
        "consumed_samples": ctx.state.consumed_samples,
        "loader_position": ctx.feeder.loader.position,
    }
    if c.save:
        # Before the first update the optimizer holds no state to save (Megatron's distributed
        # optimizer refuses); such a checkpoint holds weights and the TrainState only.
        optimizer = ctx.optimizer if ctx.scheduler.num_steps > 0 else None
        finalize_saves(ctx, blocking=True)  # one checkpoint in flight at a time
        ckpt.save_checkpoint(
            c.save, ctx.chunks, optimizer, ctx.state, c.keep_last, ctx.config_dict, pending=ctx.pending
        )


def finalize_saves(ctx: LoopContext, blocking: bool) -> None:
    """Collective: publish the background saves that every rank has finished writing (all of
    them, waiting, when ``blocking``); a failed write raises here on every rank."""
    if ctx.pending is not None:
        with ckpt.disk_full_named(ctx.cfg.checkpoint.save):  # a full disk: one line
            ctx.pending.maybe_finalize_async_calls(blocking=blocking)


def _maybe_validate(ctx: LoopContext, final: bool) -> None:
    """Validation every --eval-interval steps and at the end."""
    t = ctx.cfg.train
    due = t.eval_interval and ctx.state.iteration % t.eval_interval == 0
    if ctx.valid_feeder_factory is None or not (due or final):
        return
    loss = validate(ctx.chunks, ctx.valid_feeder_factory, t.eval_iters, ctx.cfg.data.seq_length)
    ctx.metrics.log_eval(ctx.state.iteration, loss, checkpoint=_evaluated_checkpoint(ctx))


def _evaluated_checkpoint(ctx: LoopContext) -> Optional[str]:
    """Before any step of a run started with --init-from, the weights validated are that
    checkpoint's: its folder (iter_N), so the log does not call them "step 0"."""
    init_from = ctx.cfg.checkpoint.init_from
    if ctx.state.iteration or not init_from:
        return None
    from megatron_sail.checkpoint.layout import resolve_checkpoint

    return resolve_checkpoint(init_from) or init_from


def _one_step(ctx: LoopContext) -> StepStats:
    """Load, step, update the TrainState; returns the step's stats for the metrics."""
    t0 = time.perf_counter()
    batches, row_stats = ctx.feeder.next_step()
    wait = time.perf_counter() - t0
    names = ctx.feeder.source_names
    res = train_step(
        ctx.chunks,
        ctx.optimizer,
        ctx.scheduler,
        batches,
        ctx.cfg.data.seq_length,
        row_stats,
        num_sources=len(names),
    )
    moe = step_moe_losses(ctx.cfg.model.language, ctx.feeder.plan.num_microbatches)
    s, n = ctx.state, res.counters
    src_sum, src_tok = n.get("source_loss_sum", []), n.get("source_loss_tokens", [])
    s.iteration += 1
    s.consumed_samples += ctx.cfg.train.global_batch_size
    s.skipped_steps += int(res.skipped)
    s.consumed_tokens += int(n["tokens"])
    stats = StepStats(
        iteration=s.iteration,
        lm_loss=res.loss,
        lr=group_lrs(ctx.optimizer),
        grad_norm=None if res.skipped else res.grad_norm,
        step_time_s=time.perf_counter() - t0,
        tokens=int(n["tokens"]),
        samples=int(n["samples"]),
        images=int(n["images"]),
        tiles=int(n["tiles"]),
        flops=n["flops"],
        data_wait_s=wait,
        skipped=res.skipped,
        decode_failures=int(n["decode_failures"]),
        consumed_samples=s.consumed_samples,
        consumed_tokens=s.consumed_tokens,
        source_loss={k: v / t for k, v, t in zip(names, src_sum, src_tok) if t > 0},
        source_loss_tokens=dict(zip(names, src_tok)),
        moe_losses=moe,
    )
    if ctx.image_logger is not None and s.iteration % ctx.cfg.train.log_interval == 0:
        ctx.image_logger(s.iteration, batches[0])  # after the step time was taken
    return stats


def run(ctx: LoopContext) -> int:
    """Train until --train-iters, an exit request or too many NaN steps; returns the exit code
    (0 for a normal end or a requested exit, 1 after K consecutive NaN/Inf steps). Returns only
    once every checkpoint is complete."""
    c = ctx.cfg.checkpoint
    if c.async_save and c.save and ctx.pending is None:
        ctx.pending = ThreadAsyncCallsQueue()
    code = _train(ctx)
    finalize_saves(ctx, blocking=True)
    return code


def _train(ctx: LoopContext) -> int:
    """The loop of ``run``; background saves may still be in flight when it returns."""
    t, c = ctx.cfg.train, ctx.cfg.checkpoint
    consecutive, start = 0, ctx.state.iteration
    while ctx.state.iteration < t.train_iters:
        finalize_saves(ctx, blocking=False)
        reason = ctx.watcher.should_exit()
        if reason:
            print(f"[train] {reason}: saving at step {ctx.state.iteration} and exiting", flush=True)
            save(ctx)
            return 0
        stats = _one_step(ctx)
        ctx.metrics.log_step(stats)
        consecutive = consecutive + 1 if stats.skipped else 0
        if consecutive >= t.max_skipped_steps:
            print(
                f"[train] {consecutive} consecutive steps with NaN/Inf loss or gradients: "
                f"saving the last good weights at step {ctx.state.iteration} and stopping",
                flush=True,
            )
            save(ctx)
            return 1
        it = ctx.state.iteration
        if c.save_interval and it % c.save_interval == 0 and it < t.train_iters:
            save(ctx)
        _maybe_validate(ctx, final=False)
        if ctx.benchmarks is not None:
            ctx.benchmarks.maybe_run(ctx.state)
        if t.exit_interval and it % t.exit_interval == 0 and it < t.train_iters:
            print(f"[train] --exit-interval {t.exit_interval} reached: saving and exiting", flush=True)
            save(ctx)
            return 0
    if ctx.state.iteration > start or start == 0:
        save(ctx)  # a resume already at --train-iters rewrites nothing (validation still runs)
    if not (t.eval_interval and ctx.state.iteration % t.eval_interval == 0):
        _maybe_validate(ctx, final=True)
    if ctx.benchmarks is not None:
        ctx.benchmarks.maybe_run(ctx.state, final=True)
    return 0


def decodes_images() -> bool:
    """Whether this rank decodes images: only the first pipeline stage feeds the ViT."""
    return parallel_state.is_pipeline_first_stage(ignore_virtual=True)


def dp_plan(cfg, row_cost: Optional[Callable[[int], float]] = None) -> BatchPlan:
    """The BatchPlan of this rank (balanced by ``row_cost`` when given)."""
    return BatchPlan(
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
        row_cost,
    )


def row_flops(dataset, shape) -> Callable[[int], float]:
    """Modelled step FLOPs (ViT + projector + LM) of stream row k, from its index entries only."""

    def cost(k: int) -> float:
        lengths, tiles = dataset.row_shape(k)
        return step_flops(shape, lengths, tiles)

    return cost
