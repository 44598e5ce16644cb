"""Configs of the training run itself: data sources, optimizer + schedule, checkpoints, loop.

Each component owns one small dataclass; ``config/run.py`` composes them with the model,
parallel and image configs into a ``RunConfig``. Field names follow Megatron-LM's flags
(``--lr-warmup-iters`` -> ``lr_warmup_iters``) so the command line maps one to one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataConfig:
    """Where packed rows come from (see data/dataset.py)."""

    data_path: list[str] = field(default_factory=list)
    """Training prefixes, Megatron style: ``[P1, P2]`` or ``[W1, P1, W2, P2]`` (weights first)."""
    valid_data_path: list[str] = field(default_factory=list)
    """Held-out prefixes for the periodic validation loss (same syntax as data_path)."""
    seq_length: int = 4096
    """Tokens per packed row; must match the rows written by tools/preprocess_data.py."""


@dataclass
class OptimConfig:
    """AdamW through Megatron-Core's optimizer, plus the LR schedule."""

    lr: float = 1e-5
    """Peak learning rate (the stage sets its own default; a flag overrides it)."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    weight_decay: float = 0.05
    """Decoupled weight decay; never applied to norms and biases."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    lr_warmup_iters: Optional[int] = None
    """Linear warmup from 0 to lr over this many steps (None: the stage's fraction of train_iters)."""
    lr_decay_style: str = "cosine"
    """One of cosine, WSD, linear, constant (the stage sets its default)."""
    lr_decay_iters: Optional[int] = None
    """Steps over which the LR decays (warmup included); None means train_iters."""
    lr_wsd_decay_iters: Optional[int] = None
    """WSD only: length of the final anneal; None means 10% of lr_decay_iters."""
    lr_wsd_decay_style: str = "cosine"
    """WSD only: shape of the anneal (linear, cosine, exponential, minus_sqrt)."""
    vit_lr_mult: float = 1.0
    """LR multiplier of the vision encoder's parameters."""
    projector_lr_mult: float = 1.0
    """LR multiplier of the projector's parameters."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints and the training state stored with them."""

    save: Optional[str] = None
    """Directory for checkpoints (iter_XXXXXXX/ plus a `latest` pointer); None disables saving."""
    load: Optional[str] = None
    """Directory to resume from (model, optimizer, scheduler, data position, RNG)."""
    init_from: Optional[str] = None
    """Checkpoint whose model weights start this stage; optimizer and step are not loaded.
    Either a checkpoint directory with `latest` or one iteration / HF-conversion directory."""
    save_interval: int = 0
    """Save every this many steps (0: only at exit)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints; older ones are deleted after a save completes."""
    async_save: bool = False
    """Write checkpoint files in a background thread while training goes on: the saving step
    only plans and copies tensors to host memory (one extra host copy of the checkpoint);
    `latest` moves when a later step boundary (or exit) finalizes the save."""
    overwrite_save: bool = False
    """Allow a --save folder that holds another run's checkpoints (one this run does not resume
    from): this run's checkpoints go beside them and --keep-last prunes by save order, oldest
    first. Without it such a start is refused (training/save_dir.py)."""
    exit_on_missing_checkpoint: bool = False
    """Megatron-LM's flag: stop when --load holds no checkpoint instead of starting from
    --init-from / random weights (which is the default, with a line saying so)."""
    override_opt_param_scheduler: bool = False
    """Megatron-LM's flag: on resume, take the LR schedule from the flags, not the checkpoint
    (a longer --train-iters then stretches the decay). Neither this nor the next flag: a
    schedule that differs from the checkpoint's is an error."""
    use_checkpoint_opt_param_scheduler: bool = False
    """Megatron-LM's flag: on resume, keep the checkpoint's LR schedule, ignoring the flags."""
    ckpt_verify: str = "auto"
    """Check a checkpoint against its manifest.json before loading: auto (SHA-256 of every file
    when it holds at most 1 GiB per rank, else sizes only), sizes, or full."""
    allow_tokenizer_mismatch: bool = False
    """Load a checkpoint trained on data of another tokenizer (identity, special ids) or image
    geometry (tile size, tokens per tile) than --data-path, with a warning instead of an error."""


@dataclass
class TrainConfig:
    """The loop: batch sizes, length, logging, evaluation and exit conditions."""

    train_iters: int = 1000
    """Optimizer steps to run."""
    global_batch_size: int = 8
    """Rows per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Rows per forward pass on one rank."""
    seed: int = 1234
    """Seeds model init, data order and dropout."""
    log_interval: int = 1
    """Steps between console lines (metrics.jsonl gets every step)."""
    eval_interval: int = 0
    """Steps between validation passes (0: only at the end, if valid data is set)."""
    eval_iters: int = 2
    """Global batches per validation pass."""
    run_dir: str = "runs/default"
    """Where config.yaml and metrics.jsonl go."""
    tensorboard_dir: Optional[str] = None
    """TensorBoard event directory (None: <run_dir>/tensorboard)."""
    exit_duration_in_mins: Optional[float] = None
    """Save and exit 0 once this much wall time has passed."""
    exit_interval: int = 0
    """Save and exit 0 after a step divisible by this (0: off); Megatron-LM's --exit-interval."""
    max_skipped_steps: int = 5
    """Stop (after saving the last good state) after this many consecutive NaN/Inf steps."""
    bf16: bool = False
    """bf16 weights with fp32 main params (GPU only; on CPU the flag is ignored with a warning)."""
    fp8_format: Optional[str] = None
    """Transformer Engine FP8: hybrid or e4m3 (GPU only; rejected on CPU)."""
    fp8_recipe: str = "delayed"
    """FP8 scaling: delayed or tensorwise (current scaling)."""
    fp8_vit: bool = False
    """Run the ViT in FP8 too."""
    recompute_granularity: Optional[str] = None
    """Activation recompute of the LM: selective or full."""
    recompute_vit: bool = False
    """Full activation recompute of the ViT layers."""
    progress_bar: bool = False
    """Print a one-line progress bar (quickstart)."""
