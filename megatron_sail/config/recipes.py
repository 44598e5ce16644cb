"""Run recipes: a function per model size that composes model + parallel + images + data + optim +
train + checkpoint configs for a given stage. YAML and flags override the result (config/run.py).

Batch sizes and sequence lengths of SAIL-VL were not published; the values for sail_2b / sail_8b
follow InternVL2.5 (16,384-token packed rows, global batch 512) and are OUR ASSUMPTIONS; the
later releases' recipes (sail_vl15_2b, sail_vl16_8b, sail_vl2_*) reuse them, with model shapes from their
configs (config/model.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from megatron_sail.config import model as model_cfg
from megatron_sail.config.images import ImageConfig
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.config.run_config import RunConfig
from megatron_sail.config.stage import get_stage
from megatron_sail.config.train import CheckpointConfig, DataConfig, OptimConfig, TrainConfig


def _optim_for(stage_name: str) -> OptimConfig:
    """OptimConfig carrying the stage's default LR, schedule and weight decay."""
    s = get_stage(stage_name)
    return OptimConfig(lr=s.lr, min_lr=s.min_lr, weight_decay=s.weight_decay, lr_decay_style=s.lr_decay_style)


def _base(name: str, stage: str, model, parallel, images, seq_length: int, train: TrainConfig) -> RunConfig:
    """Compose a RunConfig with the stage's defaults."""
    return RunConfig(
        recipe=name,
        stage=get_stage(stage),
        model=model,
        parallel=parallel,
        images=images,
        data=DataConfig(seq_length=seq_length),
        optim=_optim_for(stage),
        train=train,
        checkpoint=CheckpointConfig(),
    )


def tiny(stage: str = "sft-knowledge") -> RunConfig:
    """A few-MB model that trains on 2 CPU cores in minutes (tests, quickstart).

    The LR is raised to 1e-3 for every stage so that the quickstart's loss visibly drops within
    a few hundred steps; the stage's trainable-module choice is kept."""
    cfg = _base(
        "tiny",
        stage,
        model_cfg.tiny(),
        ParallelConfig(),
        ImageConfig(backend="pil", tile_size=32, threads=1),
        seq_length=256,
        train=TrainConfig(
            train_iters=200,
            global_batch_size=8,
            micro_batch_size=2,
            log_interval=10,
            eval_interval=50,
            eval_iters=2,
            run_dir="runs/tiny",
        ),
    )
    cfg.optim.lr, cfg.optim.min_lr = 1e-3, 1e-4
    cfg.optim.clip_grad = 1.0
    return cfg


def tiny_moe(stage: str = "sft-knowledge") -> RunConfig:
    """``tiny`` with the Qwen3-MoE LM of config.model.tiny_moe (4 experts, top-2): the smallest
    run of a mixture-of-experts model, e.g. with --expert-model-parallel-size 2 on 2 CPU ranks."""
    cfg = tiny(stage)
    cfg.train.run_dir = "runs/tiny_moe"
    return replace(cfg, recipe="tiny_moe", model=model_cfg.tiny_moe())


def sail_2b(stage: str = "pretrain-alignment") -> RunConfig:
    """SAIL-VL-2B (InternViT-300M + Qwen2.5-1.5B), sized for 8xH100 nodes: TP=2 with SP."""
    return _base(
        "sail_2b",
        stage,
        model_cfg.sail_2b(),
        ParallelConfig(tp=2, sp=True),
        ImageConfig(backend="auto", tile_size=448),
        seq_length=16384,
        train=TrainConfig(
            train_iters=100_000,
            global_batch_size=512,
            micro_batch_size=1,
            bf16=True,
            log_interval=10,
            eval_interval=1000,
            eval_iters=10,
            run_dir="runs/sail_2b",
        ),
    )


def sail_8b(stage: str = "pretrain-alignment") -> RunConfig:
    """SAIL-VL-8B (InternViT-300M + Qwen2.5-7B), sized for 8xH100 nodes: TP=4 with SP, PP=2."""
    return _base(
        "sail_8b",
        stage,
        model_cfg.sail_8b(),
        ParallelConfig(tp=4, pp=2, sp=True),
        ImageConfig(backend="auto", tile_size=448),
        seq_length=16384,
        train=TrainConfig(
            train_iters=100_000,
            global_batch_size=512,
            micro_batch_size=1,
            bf16=True,
            log_interval=10,
            eval_interval=1000,
            eval_iters=10,
            recompute_granularity="selective",
            run_dir="runs/sail_8b",
        ),
    )


def _h100_train(run_dir: str, recompute: str | None = None) -> TrainConfig:
    """The 2B/8B recipes' training loop settings (our assumptions, as for sail_2b/sail_8b)."""
    return TrainConfig(
        train_iters=100_000,
        global_batch_size=512,
        micro_batch_size=1,
        bf16=True,
        log_interval=10,
        eval_interval=1000,
        eval_iters=10,
        recompute_granularity=recompute,
        run_dir=run_dir,
    )


def sail_vl15_2b(stage: str = "pretrain-alignment") -> RunConfig:
    """SAIL-VL-1.5-2B (AIMv2-Huge + Qwen2.5-1.5B), sized like sail_2b: TP=2 with SP (12 ViT and
    12 LM heads split evenly)."""
    return _base(
        "sail_vl15_2b",
        stage,
        model_cfg.sail_vl15_2b(),
        ParallelConfig(tp=2, sp=True),
        ImageConfig(backend="auto", tile_size=448),
        seq_length=16384,
        train=_h100_train("runs/sail_vl15_2b"),
    )


def sail_vl16_8b(stage: str = "pretrain-alignment") -> RunConfig:
    """SAIL-VL-1.6-8B (SAILViT-Huge + Qwen2.5-7B), sized like sail_8b: TP=4 with SP, PP=2."""
    return _base(
        "sail_vl16_8b",
        stage,
        model_cfg.sail_vl16_8b(),
        ParallelConfig(tp=4, pp=2, sp=True),
        ImageConfig(backend="auto", tile_size=448),
        seq_length=16384,
        train=_h100_train("runs/sail_vl16_8b", "selective"),
    )


def sail_vl2_2b(stage: str = "pretrain-alignment") -> RunConfig:
    """SAIL-VL2-2B (SAILViT-Huge + Qwen3-1.7B) on 8xH100 nodes: TP=2 with SP."""
    return _base(
        "sail_vl2_2b",
        stage,
        model_cfg.sail_vl2_2b(),
        ParallelConfig(tp=2, sp=True),
        ImageConfig(backend="auto", tile_size=448),
        seq_length=16384,
        train=_h100_train("runs/sail_vl2_2b"),
    )


def sail_vl2_8b(stage: str = "pretrain-alignment") -> RunConfig:
    """SAIL-VL2-8B (SAILViT-Huge + Qwen3-8B) on 8xH100 nodes: TP=4 with SP, PP=2 (18 + 18
    layers), selective recompute, as sail_8b."""
    return _base(
        "sail_vl2_8b",
        stage,
        model_cfg.sail_vl2_8b(),
        ParallelConfig(tp=4, pp=2, sp=True),
        ImageConfig(backend="auto", tile_size=448),
        seq_length=16384,
        train=_h100_train("runs/sail_vl2_8b", "selective"),
    )


def sail_vl2_30b_a3b(stage: str = "pretrain-alignment") -> RunConfig:
    """SAIL-VL2-30B-A3B (MoE, 128 experts, top-8) on two 8xH100 nodes: EP=8 (16 experts per
    rank), PP=2 (24 + 24 layers), TP=1. The report trains its MoE with pipeline + expert
    parallelism on Megatron (section 5.2); the exact layout was not published."""
    return _base(
        "sail_vl2_30b_a3b",
        stage,
        model_cfg.sail_vl2_30b_a3b(),
        ParallelConfig(tp=1, pp=2, ep=8),
        ImageConfig(backend="auto", tile_size=448),
        seq_length=16384,
        train=_h100_train("runs/sail_vl2_30b_a3b", "selective"),
    )


RECIPES: dict[str, Callable[[str], RunConfig]] = {
    "tiny": tiny,
    "tiny_moe": tiny_moe,
    "sail_2b": sail_2b,
    "sail_8b": sail_8b,
    "sail_vl15_2b": sail_vl15_2b,
    "sail_vl16_8b": sail_vl16_8b,
    "sail_vl2_2b": sail_vl2_2b,
    "sail_vl2_8b": sail_vl2_8b,
    "sail_vl2_30b_a3b": sail_vl2_30b_a3b,
}
"""Named recipes (--recipe): the one table of recipe names; each returns the whole RunConfig
(``model_recipe`` gives its model alone)."""


def get_recipe(name: str) -> Callable[[str], RunConfig]:
    """Look a recipe up by name, with a clear error listing the valid ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
    return RECIPES[name]


def model_recipe(name: str) -> model_cfg.ModelConfig:
    """The model of recipe ``name`` (what --recipe NAME trains, before data and flags)."""
    return get_recipe(name)().model
