"""Optimizer and LR schedule, built with Megatron-Core's own pieces.

Parameter groups come from ``ParamKey`` overrides: no weight decay on norms and biases (every 1-D
parameter), and per-module peak/min LR for the ViT and the projector (``--vit-lr-mult``,
``--projector-lr-mult``). Megatron's scheduler reads ``max_lr`` / ``min_lr`` per group, so a
multiplier is applied by scaling those two, which keeps warmup and decay shapes identical.
"""

from __future__ import annotations

from typing import Iterable

import torch
from megatron.core.optimizer import (
    MegatronOptimizer,
    OptimizerConfig,
    ParamKey,
    ParamPredicate,
    get_megatron_optimizer,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_sail.config.train import OptimConfig
from megatron_sail.models.sail_vl import unwrap

VISION_MODULE = "vision_model"
"""Attribute name of the ViT inside SailVLModel."""
PROJECTOR_MODULE = "projector"
"""Attribute name of the projector inside SailVLModel."""


def module_param_ids(chunks: Iterable[torch.nn.Module], attr: str) -> frozenset[int]:
    """ids of the parameters of submodule ``attr`` in every chunk that has it (pipeline stages
    without a ViT simply contribute nothing)."""
    ids = set()
    for chunk in chunks:
        sub = getattr(unwrap(chunk), attr, None)
        if isinstance(sub, torch.nn.Module):
            ids.update(id(p) for p in sub.parameters())
    return frozenset(ids)


def megatron_optimizer_config(cfg: OptimConfig, bf16: bool) -> OptimizerConfig:
    """Translate our OptimConfig into Megatron-Core's: bf16 keeps fp32 main params and grads
    (GPU); on CPU everything is fp32."""
    return OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        main_params_dtype=torch.float32,
        main_grads_dtype=torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )


def param_group_overrides(cfg: OptimConfig, chunks: list[torch.nn.Module]) -> dict:
    """ParamKey -> override: wd 0 on 1-D params and biases; scaled LR on ViT and projector."""
    no_wd = ParamKey(name="*.bias", predicate=ParamPredicate(name="ndim1", fn=lambda p: p.dim() == 1))
    overrides: dict = {no_wd: {"wd_mult": 0.0}}
    for attr, mult in ((VISION_MODULE, cfg.vit_lr_mult), (PROJECTOR_MODULE, cfg.projector_lr_mult)):
        if mult == 1.0:
            continue
        ids = module_param_ids(chunks, attr)
        key = ParamKey(predicate=ParamPredicate(name=f"{attr}_lr", fn=lambda p, s=ids: id(p) in s))
        overrides[key] = {"max_lr": cfg.lr * mult, "min_lr": cfg.min_lr * mult}
    return overrides


def build_optimizer(cfg: OptimConfig, chunks: list[torch.nn.Module], bf16: bool = False) -> MegatronOptimizer:
    """Megatron-Core optimizer (distributed when configured) over the trainable params."""
    optimizer = get_megatron_optimizer(
        megatron_optimizer_config(cfg, bf16), chunks, config_overrides=param_group_overrides(cfg, chunks)
    )
    use_foreach(optimizer)
    return optimizer


def torch_adams(optimizer) -> list[torch.optim.Optimizer]:
    """The plain torch Adam/AdamW instances inside a Megatron optimizer (chained or not);
    empty when Apex or Transformer Engine supplied a fused Adam."""
    found = []
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if type(inner) in (torch.optim.Adam, torch.optim.AdamW):
            found.append(inner)
    return found


def use_foreach(optimizer) -> None:
    """Run torch's Adam/AdamW over all tensors of a group at once (``foreach``).

    Without Apex/TE, Megatron falls back to torch's AdamW with ``foreach=None``, which torch
    resolves to the one-tensor-at-a-time loop unless every parameter is on CUDA: on the CPU
    that loop costs 2-3x transformers' optimizer time. foreach does the same arithmetic per
    element (tests/unit/test_platform_cpu.py compares the two). A fused Adam is left alone."""
    for inner in torch_adams(optimizer):
        for group in inner.param_groups:
            if not group.get("fused"):
                group["foreach"] = True


def build_scheduler(cfg: OptimConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """Warmup + cosine / WSD / linear / constant decay, stepped once per optimizer step.
    Expects a finalized OptimConfig (warmup and decay iters filled in by config.run.finalize)."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=cfg.lr_warmup_init,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters,
        lr_decay_steps=cfg.lr_decay_iters,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.lr_decay_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=cfg.lr_wsd_decay_iters,
        lr_wsd_decay_style=cfg.lr_wsd_decay_style,
    )


def group_lrs(optimizer: MegatronOptimizer) -> dict[str, float]:
    """Current LR per parameter group, named by what the group holds (for TensorBoard)."""
    out = {}
    for i, group in enumerate(optimizer.param_groups):
        tag = "default" if group.get("default_config", False) else f"group{i}"
        if group.get("wd_mult", 1.0) == 0.0:
            tag += "_no_wd"
        out[f"lr/{tag}"] = float(group["lr"])
    return out
