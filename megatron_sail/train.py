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
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.utils import get_model_config

from megatron_sail import cli
from megatron_sail.checkpoint import from_checkpoint, layout
from megatron_sail.checkpoint.from_checkpoint import resolve
from megatron_sail.config.run import RunConfig, random_init_problem, to_dict, write_resolved
from megatron_sail.config.stage import POST_TRAINING
from megatron_sail.data import geometry
from megatron_sail.data.images.pipeline import build_image_pipeline
from megatron_sail.data.loading.dataset import build_blended
from megatron_sail.models.sail_vl import SailVLModel
from megatron_sail.platform import distributed as platform
from megatron_sail.training import checkpoint as ckpt
from megatron_sail.training import resume_checks
from megatron_sail.training.flops import device_peak_flops, shape_from_model_config
from megatron_sail.training.loop import LoopContext, StepFeeder, decodes_images, dp_plan, row_flops, run
from megatron_sail.training.metrics import MetricsConfig, MetricsWriter
from megatron_sail.training.optimizer import build_optimizer, build_scheduler, use_foreach
from megatron_sail.training.precision import apply_fp8, check_precision
from megatron_sail.training.recompute import RecomputeConfig, apply_recompute
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


def build_chunks(cfg: RunConfig, dtype: torch.dtype) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), frozen per the stage, with
    activation recompute and FP8 as configured."""
    chunks = []
    for vp in range(cfg.parallel.vpp or 1):
        vp_stage = vp if cfg.parallel.vpp else None
        model = SailVLModel(
            cfg.model,
            cfg.parallel,
            dtype=dtype,
            vp_stage=vp_stage,
            use_te=use_te(cfg),
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        )
        apply_recompute(
            model,
            RecomputeConfig(
                cfg.train.recompute_granularity,
                cfg.train.recompute_vit,
                cfg.train.recompute_method,
                cfg.train.recompute_num_layers,
            ),
        )
        apply_fp8(model, cfg.train.fp8_format, cfg.train.fp8_recipe, cfg.train.fp8_vit)
        s = cfg.stage
        model.freeze(
            vision=not s.train_vision, projector=not s.train_projector, language=not s.train_language
        )
        chunks.append(model.to(platform.device()))
    return chunks


def use_te(cfg: RunConfig) -> Optional[bool]:
    """--transformer-impl: local -> False, transformer_engine -> True (refused at start when
    TE or CUDA is missing, not at the first TE kernel), unset -> None (the model's auto)."""
    impl = cfg.train.transformer_impl
    if impl == "transformer_engine":
        from megatron_sail.models.layer_specs import te_available

        if not te_available():
            raise RuntimeError(
                "--transformer-impl transformer_engine: Transformer Engine is "
                "not importable or CUDA is missing; use --transformer-impl local"
            )
        return True
    return False if impl == "local" else None


def ddp_config(cfg: RunConfig) -> DistributedDataParallelConfig:
    """Megatron-Core DDP settings: --overlap-grad-reduce / --overlap-param-gather, each on by
    default with CUDA (and the distributed optimizer for the gather), off on CPU."""
    p, dist_opt = cfg.parallel, cfg.optim.use_distributed_optimizer
    cuda = platform.has_cuda()
    grad = cuda if p.overlap_grad_reduce is None else p.overlap_grad_reduce
    gather = (grad and dist_opt) if p.overlap_param_gather is None else p.overlap_param_gather
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=grad,
        overlap_param_gather=gather,
        use_distributed_optimizer=dist_opt,
        check_for_nan_in_grad=False,
        bucket_size=40_000_000 if grad else None,
    )


def wrap_ddp(cfg: RunConfig, chunks: list) -> list:
    """Megatron-Core DDP around each chunk (settings: ddp_config)."""
    ddp = ddp_config(cfg)
    for chunk in chunks:
        get_model_config(chunk).calculate_per_token_loss = True
    return [
        DistributedDataParallel(config=get_model_config(c), ddp_config=ddp, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]


def hook_model_config(chunks: list, optimizer) -> None:
    """Tell the pipeline schedules how to scale, sync and finalize gradients."""
    config = get_model_config(chunks[0])
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [c.no_sync for c in chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if len(chunks) > 1:
        # Interleaved schedule: a rank sends activations forward AND gradients backward to the
        # same peer in one exchange when PP=2 (the pipeline is a ring). The batched exchange
        # posts them in an order the peer's receives do not match (on gloo this swapped
        # activations and gradients, silently: same shapes); the unbatched exchange orders them
        # by rank parity so that each send meets the matching receive.
        config.batch_p2p_comm = False
        if chunks[0].ddp_config.overlap_grad_reduce:
            config.grad_sync_func = [c.start_grad_sync for c in chunks]


def load_state(
    cfg: RunConfig, chunks: list, optimizer, scheduler, checks: Optional[ckpt.LoadChecks] = None
) -> ckpt.TrainState:
    """--load resumes everything when it holds a checkpoint; otherwise --init-from loads
    weights only; otherwise training starts from the random init. ``checks`` (manifest,
    tokenizer) apply to both; the LR schedule and --train-iters are checked on resume."""
    c = cfg.checkpoint
    log = print if torch.distributed.get_rank() == 0 else (lambda _line: None)
    if c.finetune:  # Megatron-LM's --finetune: weights of --load, everything else fresh
        if layout.resolve_checkpoint(c.load) is None:
            raise FileNotFoundError(f"--finetune --load {c.load}: no checkpoint there")
        ckpt.load_checkpoint(c.load, chunks, optimizer=None, checks=checks)
        optimizer.reload_model_params()
        log(f"[train] --finetune: weights from {c.load}; optimizer, LR schedule and iteration start fresh")
        return ckpt.TrainState()
    state = (
        ckpt.load_checkpoint(
            c.load, chunks, optimizer, checks, load_optim=not c.no_load_optim, load_rng=not c.no_load_rng
        )
        if c.load
        else None
    )
    if state is not None:
        where = layout.resolve_checkpoint(c.load)
        resume_checks.check_train_iters(state.iteration, cfg.train.train_iters, where)
        if c.no_load_optim:  # Megatron-LM loads neither the optimizer nor its LR schedule
            log(
                f"[train] --no-load-optim: optimizer state and LR schedule of {where} not "
                "loaded (the schedule starts again from its step 0)"
            )
            return state
        resume_checks.restore_scheduler(
            scheduler,
            state.scheduler,
            c.override_opt_param_scheduler,
            c.use_checkpoint_opt_param_scheduler,
            where,
            log,
        )
        return state
    if c.load:
        resume_checks.missing_checkpoint(c.load, c.exit_on_missing_checkpoint, c.init_from, log)
    if c.init_from:
        ckpt.load_checkpoint(c.init_from, chunks, optimizer=None, checks=checks)
        # With bf16 weights the optimizer copied them into fp32 main weights when it was built;
        # without this the first step would write the random init back.
        optimizer.reload_model_params()
    return ckpt.TrainState()


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
        from megatron_sail.training.posttrain import train_posttrain

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
    metrics = MetricsWriter(
        cfg.train.run_dir,
        cfg.train.tensorboard_dir,
        cfg.train.log_interval,
        torch.distributed.get_rank(),
        MetricsConfig(
            total_iters=cfg.train.train_iters,
            world_size=torch.distributed.get_world_size(),
            peak_flops=device_peak_flops(),
            progress_bar=cfg.train.progress_bar,
            start_iteration=state.iteration,
            log_throughput=cfg.train.log_throughput,
            tensorboard_log_interval=cfg.train.tensorboard_log_interval,
            wandb_project=cfg.train.wandb_project,
            wandb_exp_name=cfg.train.wandb_exp_name,
            wandb_save_dir=cfg.train.wandb_save_dir,
            run_config=to_dict(cfg),
        ),
    )
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
