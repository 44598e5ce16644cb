"""The post-training stages ``dpo`` and ``grpo``: ``python -m megatron_sail.train --stage dpo|grpo``.

Same start as every stage (train.py: platform, chunks, Megatron DDP, optimizer, scheduler,
checkpoint load, metrics), then a loop of its own, because the data is not packed indexed rows:

* dpo: JSONL preference pairs are tokenized at start-up with the starting checkpoint's tokenizer
  and processor settings (data/preprocess/preference.py, posttrain/pair_rows.py), the reference log-probs
  are computed (or read) once, and each step takes --global-batch-size rows of pairs;
* grpo: prompts with reference answers are read at start-up (posttrain/prompts.py); each step samples
  completions with the generation engine from the live model, scores them and updates.

Order and resume: step k uses rows (prompts) [k*G, (k+1)*G) of an endless stream that
reshuffles every epoch with a seed of (--seed, epoch); the position is the TrainState's
consumed_samples, so a resumed run continues with the rows the uninterrupted run would have
used. Stage-specific state (BCO's reward baseline; GRPO's rollout seeds) is in TrainState.data.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch

from megatron_sail.checkpoint import layout
from megatron_sail.config.run import RunConfig, to_dict, write_resolved
from megatron_sail.platform import distributed as platform
from megatron_sail.training import checkpoint as ckpt
from megatron_sail.training.metrics import MetricsWriter, StepStats, writer_for_run


@dataclass
class Setup:
    """What both post-training loops start from."""

    cfg: RunConfig
    chunks: list
    optimizer: object
    scheduler: object
    state: ckpt.TrainState
    tokenizer: object
    settings: object
    """ProcessorSettings of the starting checkpoint (tiling, template)."""
    metrics: MetricsWriter
    pipeline: object
    """Image pipeline (tiles for the first pipeline stage)."""
    log: Callable[[str], None]
    lock: object = None
    """The save directory's lock, held for the run."""


def starting_checkpoint(cfg: RunConfig) -> str:
    """The checkpoint whose tokenizer and processor settings the run uses: the latest one in
    --load when there is one, else --init-from."""
    c = cfg.checkpoint
    for root in (c.load, c.init_from):
        if root and os.path.isdir(root) and layout.resolve_checkpoint(root):
            return layout.resolve_checkpoint(root)
    raise ValueError(
        f"--stage {cfg.stage.name} starts from a trained model: give --init-from "
        "(a training, converted or soup checkpoint with tokenizer/)"
    )


def _assets(cfg: RunConfig):
    """Tokenizer and processor settings of the starting checkpoint, and ``cfg`` with its
    image-context id and tile size (a new RunConfig)."""
    from megatron_sail.data.tokenizer import load_tokenizer
    from megatron_sail.inference.loading import inspect_checkpoint

    info = inspect_checkpoint(starting_checkpoint(cfg))
    if info.tokenizer_path is None:
        raise FileNotFoundError(
            f"{info.path}: no tokenizer/ folder; post-training tokenizes its "
            "data with the starting checkpoint's tokenizer"
        )
    tok = load_tokenizer(info.tokenizer_path)
    cfg = replace(
        cfg,
        model=replace(cfg.model, img_context_token_id=tok.special.img_context),
        images=replace(cfg.images, tile_size=info.settings.tile_size),
    )
    return cfg, tok, info.settings


def setup(cfg: RunConfig) -> Setup:
    """Platform, model, optimizer, checkpoint and metrics, as train.train() builds them."""
    from megatron_sail.data.images import build_image_pipeline
    from megatron_sail.training.model_setup import build_chunks, hook_model_config, load_state, wrap_ddp
    from megatron_sail.training.optimizer import build_optimizer, build_scheduler
    from megatron_sail.training.precision import check_precision
    from megatron_sail.training.save_dir import prepare_save_dir

    dtype = check_precision(cfg)
    platform.initialize(cfg.parallel, cfg.train.seed)
    c = cfg.checkpoint
    lock = prepare_save_dir(c.save, c.load, c.overwrite_save)
    rank0 = torch.distributed.get_rank() == 0
    log = (lambda line: print(line, flush=True)) if rank0 else (lambda _line: None)
    cfg, tok, settings = _assets(cfg)
    if rank0:
        write_resolved(cfg, cfg.train.run_dir)
    chunks = wrap_ddp(cfg, build_chunks(cfg, dtype))
    optimizer = build_optimizer(cfg.optim, chunks, bf16=dtype == torch.bfloat16)
    scheduler = build_scheduler(cfg.optim, optimizer)
    hook_model_config(chunks, optimizer)
    state = load_state(
        cfg, chunks, optimizer, scheduler, ckpt.LoadChecks(c.ckpt_verify, {}, c.allow_tokenizer_mismatch)
    )
    state.scheduler = scheduler.state_dict()
    metrics = writer_for_run(cfg, state.iteration, progress_bar=False, log_throughput=False)
    return Setup(
        cfg,
        chunks,
        optimizer,
        scheduler,
        state,
        tok,
        settings,
        metrics,
        build_image_pipeline(cfg.images),
        log,
        lock,
    )


def optimizer_update(optimizer, scheduler, loss: float) -> tuple[float, bool]:
    """After the backward passes: gradient norm, then the clipped update and a scheduler step
    unless the loss or the norm is NaN/Inf on any rank (as training/step.py). Returns
    (grad norm, skipped)."""
    from megatron_sail.compat import optimizer as compat_optimizer
    from megatron_sail.training.step import _all_finite

    found_inf = compat_optimizer.prepare_grads(optimizer)
    grad_norm = float("inf") if found_inf else compat_optimizer.grad_norm(optimizer)
    if not _all_finite(loss, grad_norm):
        return grad_norm, True
    compat_optimizer.clip_and_update(optimizer, grad_norm)
    scheduler.step(increment=1)
    return grad_norm, False


def stream_index(position: int, n: int, seed: int) -> int:
    """Item of the endless reshuffled stream at ``position`` (epoch e is a permutation seeded by
    (seed, e)): a pure function of the position, so resumes need no loader state."""
    epoch, k = divmod(position, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[k])


def save(s: Setup) -> None:
    """Checkpoint the current state (weights, optimizer, TrainState with stage data)."""
    c = s.cfg.checkpoint
    if not c.save:
        return
    s.state.scheduler = s.scheduler.state_dict()
    optimizer = s.optimizer if s.scheduler.num_steps > 0 else None
    ckpt.save_checkpoint(c.save, s.chunks, optimizer, s.state, c.keep_last, to_dict(s.cfg))


def log_step(
    s: Setup,
    loss: float,
    grad_norm: Optional[float],
    t0: float,
    tokens: int,
    samples: int,
    extra: dict,
    skipped: bool = False,
) -> None:
    """One metrics record (metrics.jsonl, TensorBoard, W&B, console)."""
    from megatron_sail.training.optimizer import group_lrs

    s.metrics.log_step(
        StepStats(
            iteration=s.state.iteration,
            lm_loss=loss,
            lr=group_lrs(s.optimizer),
            grad_norm=None if skipped else grad_norm,
            step_time_s=time.perf_counter() - t0,
            tokens=tokens,
            samples=samples,
            skipped=skipped,
            consumed_samples=s.state.consumed_samples,
            consumed_tokens=s.state.consumed_tokens,
            extra=extra,
        )
    )


def run_loop(s: Setup, one_step: Callable[[Setup], None]) -> int:
    """Steps until --train-iters, saving every --save-interval and at the end."""
    t, c = s.cfg.train, s.cfg.checkpoint
    start = s.state.iteration
    while s.state.iteration < t.train_iters:
        one_step(s)
        it = s.state.iteration
        if c.save_interval and it % c.save_interval == 0 and it < t.train_iters:
            save(s)
        if t.exit_interval and it % t.exit_interval == 0 and it < t.train_iters:
            s.log(f"[train] --exit-interval {t.exit_interval} reached: saving and exiting")
            save(s)
            return 0
    if s.state.iteration > start or start == 0:
        save(s)
    return 0
