"""A rank's model for training: its chunks (frozen per stage, recompute, FP8), wrapped in
Megatron-Core DDP, hooked to the optimizer for the pipeline schedules, and loaded from --load /
--init-from. Shared by the SFT/pretraining entry (train.py) and the post-training stages
(posttrain/), so that neither builds the model its own way.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.utils import get_model_config

from megatron_sail.checkpoint import layout
from megatron_sail.config.run import RunConfig
from megatron_sail.models.sail_vl import SailVLModel
from megatron_sail.platform import distributed as platform
from megatron_sail.training import checkpoint as ckpt
from megatron_sail.training import resume_checks
from megatron_sail.training.precision import apply_fp8
from megatron_sail.training.recompute import RecomputeConfig, apply_recompute


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
