"""Entry point: ``python -m torch.distributed.run ... -m megatron_sail.train --recipe R --stage S
[--config F] [flags]`` (or one ``srun`` task per GPU; see platform/distributed.py).

One straight-line ``train()``: resolve the config, start the platform, build this rank's model
chunks, wrap them in Megatron-Core DDP, build optimizer + scheduler, load a checkpoint, then
hand over to the loop (training/loop.py), which validates, saves and exits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Optional

import torch

from megatron_sail import cli
from megatron_sail.checkpoint import from_checkpoint, layout
from megatron_sail.checkpoint.from_checkpoint import resolve
from megatron_sail.config.run import RunConfig, random_init_problem, to_dict, write_resolved
from megatron_sail.config.stage import POST_TRAINING
from megatron_sail.data import geometry
from megatron_sail.data.images import build_image_pipeline
from megatron_sail.data.loading.dataset import build_blended
from megatron_sail.platform import distributed as platform
from megatron_sail.training import checkpoint as ckpt
from megatron_sail.training import resume_checks
from megatron_sail.training.flops import shape_from_model_config
from megatron_sail.training.loop import LoopContext, StepFeeder, decodes_images, dp_plan, row_flops, run
from megatron_sail.training.metrics import MetricsWriter, writer_for_run
from megatron_sail.training.model_setup import build_chunks, hook_model_config, load_state, wrap_ddp
from megatron_sail.training.optimizer import build_optimizer, build_scheduler, use_foreach
from megatron_sail.training.precision import check_precision
from megatron_sail.training.save_dir import prepare_save_dir
from megatron_sail.training.signals import ExitWatcher

log = logging.getLogger(__name__)


def match_data(cfg: RunConfig, dataset) -> RunConfig:
    """``cfg`` with the token ids and tile geometry of the preprocessed data (the source of
    truth), as a new RunConfig."""
    meta = dataset.tokenizer_meta
    model = replace(cfg.model, img_context_token_id=meta.img_context_id)
    cfg = replace(cfg, model=model, images=replace(cfg.images, tile_size=meta.tile_size))
    if dataset.seq_length != cfg.data.seq_length:
        raise ValueError(
            f"--seq-length {cfg.data.seq_length} but the data rows hold "
            f"{dataset.seq_length} tokens ({cfg.data.data_path})"
        )
    for d in getattr(dataset, "datasets", [dataset]):  # each prefix, naming its meta.json
        problem = geometry.mismatch(
            f"{d.prefix}.meta.json", d.meta.get("tokenizer", {}), cfg.model, cfg.recipe
        )
        if problem:
            raise ValueError(problem)
    if model.language.vocab_size < meta.vocab_size:
        multiple = 128 * cfg.parallel.tp
        vocab = -(-meta.vocab_size // multiple) * multiple
        log.warning(
            f"model vocab raised to {vocab} to cover the data's {meta.vocab_size} token ids", stacklevel=2
        )
        cfg = replace(cfg, model=replace(model, language=replace(model.language, vocab_size=vocab)))
    return cfg


def check_tokenizer(cfg: RunConfig, train_data) -> None:
    """Fail at start, naming the dataset, when the tokenizer its meta.json records cannot be
    found and the run needs it (checkpoints carry it for generate/export; benchmarks and
    --log-images decode with it)."""
    from megatron_sail.checkpoint.assets import resolve_tokenizer_path

    if not (cfg.checkpoint.save or cfg.eval.benchmarks or cfg.train.log_images):
        return
    first = train_data.datasets[0]
    recorded = (first.meta.get("tokenizer") or {}).get("path")
    if recorded:
        resolve_tokenizer_path(f"{first.prefix}.meta.json", recorded)


def image_logger(cfg: RunConfig, train_data, metrics: MetricsWriter):
    """--log-images: write sample images with their text through the metrics writer; the text
    is decoded with the data's tokenizer (token ids when its file is not readable here)."""
    from megatron_sail.data.tokenizer import load_tokenizer

    path = train_data.datasets[0].meta.get("tokenizer", {}).get("path")
    try:
        decode = load_tokenizer(path).decode
    except (OSError, ValueError, TypeError) as e:
        print(f"[train] --log-images: tokenizer {path} not loadable ({e}); texts show token ids")
        decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    meta = train_data.tokenizer_meta
    return lambda it, batch: metrics.log_images(
        it, batch, decode, cfg.images.mean, cfg.images.std, meta.img_context_id, cfg.train.log_images
    )


def train(cfg: RunConfig) -> int:
    """Run one training stage; returns the process exit code."""
    if cfg.stage.name in POST_TRAINING:  # dpo / grpo: their own data and loop
        from megatron_sail.posttrain.run import train_posttrain

        return train_posttrain(cfg)
    c = cfg.checkpoint
    problem = random_init_problem(
        cfg, has_checkpoint=bool(c.load) and layout.resolve_checkpoint(c.load) is not None
    )
    if problem:
        raise ValueError(problem)
    dtype = check_precision(cfg)
    platform.initialize(cfg.parallel, cfg.train.seed)
    watcher = ExitWatcher(cfg.train.exit_duration_in_mins).install()
    lock = prepare_save_dir(c.save, c.load, c.overwrite_save)  # noqa: F841 - held for the run
    train_data = build_blended(cfg.data.data_path, cfg.train.seed, cfg.data.data_verify)
    cfg = match_data(cfg, train_data)
    check_tokenizer(cfg, train_data)
    from_checkpoint.check_model(
        cfg, print if torch.distributed.get_rank() == 0 else (lambda _line: None)
    )  # before a shape traceback in the load
    data_block = resume_checks.data_tokenizer_block([train_data], c.allow_tokenizer_mismatch)
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        path = write_resolved(cfg, cfg.train.run_dir)
        print(
            f"run dir: {os.path.abspath(cfg.train.run_dir)} (config {os.path.basename(path)}, "
            f"metrics, TensorBoard {cfg.train.tensorboard_dir})",
            flush=True,
        )
    chunks = wrap_ddp(cfg, build_chunks(cfg, dtype))
    optimizer = build_optimizer(cfg.optim, chunks, bf16=dtype == torch.bfloat16)
    scheduler = build_scheduler(cfg.optim, optimizer)
    hook_model_config(chunks, optimizer)
    state = load_state(
        cfg,
        chunks,
        optimizer,
        scheduler,
        ckpt.LoadChecks(c.ckpt_verify, data_block, c.allow_tokenizer_mismatch),
    )
    use_foreach(optimizer)  # a loaded optimizer state brings its saved param-group flags back
    state.scheduler = scheduler.state_dict()
    state.tokenizer = data_block
    if c.load and state.iteration == cfg.train.train_iters and layout.resolve_checkpoint(c.load):
        if rank0:  # the loop then runs no step and saves nothing; final validation still runs
            print(
                f"[train] the checkpoint in --load {c.load} is at iteration {state.iteration} "
                f"= --train-iters: nothing to train (raise --train-iters to continue)",
                flush=True,
            )
    pipeline = build_image_pipeline(cfg.images)
    shape = shape_from_model_config(cfg.model, cfg.images.tile_size)
    decode = decodes_images()
    feeder = StepFeeder(
        train_data,
        dp_plan(cfg, row_flops(train_data, shape) if cfg.train.balance_dp else None),
        pipeline,
        state.consumed_samples // cfg.train.global_batch_size,
        shape,
        depth=cfg.images.prefetch_depth,
        decode=decode,
        pin_memory=cfg.images.pin_memory,
    )
    valid = None
    if cfg.data.valid_data_path:
        valid_data = build_blended(cfg.data.valid_data_path, cfg.train.seed, cfg.data.data_verify)
        resume_checks.data_tokenizer_block([train_data, valid_data], c.allow_tokenizer_mismatch)
        valid = lambda: StepFeeder(  # noqa: E731
            valid_data,
            dp_plan(cfg),
            pipeline,
            0,
            None,
            depth=1,
            decode=decode,
        )
    metrics = writer_for_run(cfg, state.iteration)
    ctx = LoopContext(cfg, chunks, optimizer, scheduler, state, feeder, metrics, watcher, valid, to_dict(cfg))
    if cfg.train.log_images and decode and rank0:
        ctx.image_logger = image_logger(cfg, train_data, metrics)
    if cfg.eval.benchmarks:  # --eval-benchmark: scores of the live model (eval/hook.py)
        from megatron_sail.eval.hook import BenchmarkHook

        ctx.benchmarks = BenchmarkHook(
            cfg.eval, chunks, cfg.model, train_data.datasets[0].meta, metrics, cfg.train.run_dir
        )
    try:
        return run(ctx)
    finally:
        feeder.close()
        metrics.close()


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry: resolve flags, train, tear down; returns the loop's exit code
    (``cli.run`` turns a user error into one line and exit code 2)."""
    cfg = resolve(argv)
    code = train(cfg)
    platform.shutdown()
    return code


if __name__ == "__main__":
    cli.run(main)
