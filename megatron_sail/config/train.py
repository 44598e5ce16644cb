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
    """Where packed rows come from (see data/loading/dataset.py)."""

    data_path: list[str] = field(default_factory=list)
    """Training prefixes, Megatron style: ``[P1, P2]`` or ``[W1, P1, W2, P2]`` (weights first)."""
    valid_data_path: list[str] = field(default_factory=list)
    """Held-out prefixes for the periodic validation loss (same syntax as data_path)."""
    seq_length: int = 4096
    """Tokens per packed row; must match the rows written by tools/preprocess_data.py."""
    data_verify: str = "cheap"
    """Load-time check of every source on every rank (data/integrity.py): cheap (sizes, digests
    of files up to 1 MiB, headers, end offsets, 4,096 sampled entries per stream: a cost
    independent of the number of rows) or full (every digest and every entry: reads every byte;
    run tools/inspect_dataset.py --verify once after preprocessing instead)."""


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
    lr_warmup_samples: Optional[int] = None
    """Megatron-LM's --lr-warmup-samples: warmup length in rows (with --train-samples); turned
    into steps of global_batch_size by config.run.finalize."""
    lr_warmup_fraction: Optional[float] = None
    """Megatron-LM's --lr-warmup-fraction: warmup as a fraction of the decay steps
    (lr_decay_iters); excludes the other warmup settings."""
    lr_warmup_init: float = 0.0
    """Megatron-LM's --lr-warmup-init: the LR warmup starts from (then rises linearly to lr)."""
    lr_decay_style: str = "cosine"
    """One of cosine, WSD, linear, constant (the stage sets its default)."""
    lr_decay_iters: Optional[int] = None
    """Steps over which the LR decays (warmup included); None means train_iters."""
    lr_decay_samples: Optional[int] = None
    """Megatron-LM's --lr-decay-samples: the decay length in rows (with --train-samples);
    turned into steps of global_batch_size."""
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
    allow_random_init: bool = False
    """Start a stage that trains neither the ViT nor the LLM (pretrain-alignment) without
    --init-from: the projector would learn to connect two random networks. Refused unless
    given (tests and toy runs)."""
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
    finetune: bool = False
    """Megatron-LM's --finetune: --load gives the model weights only; optimizer, LR schedule,
    RNG and step counters start fresh (iteration 0), as with --init-from."""
    no_load_optim: bool = False
    """Megatron-LM's --no-load-optim: a resume reads weights, step counters and data position
    but neither the optimizer state nor the LR schedule (both start fresh, as in Megatron-LM)."""
    no_load_rng: bool = False
    """Megatron-LM's --no-load-rng: a resume keeps this run's seeded RNG instead of the saved one."""
    ckpt_format: str = "torch_dist"
    """Megatron-LM's --ckpt-format: only torch_dist (Megatron-Core dist_checkpointing on
    torch.distributed.checkpoint), the format this trainer writes and reads."""
    use_checkpoint_args: bool = False
    """Megatron-LM's --use-checkpoint-args: the model config comes from the --load / --init-from
    checkpoint even when --recipe names another model (YAML model fields that differ from the
    checkpoint stay errors). Without it the checkpoint's model is used when --recipe is not given
    and must match the recipe's when it is (checkpoint/from_checkpoint.py)."""
    allow_tokenizer_mismatch: bool = False
    """Load a checkpoint trained on data of another tokenizer (identity, special ids) or image
    geometry (tile size, tokens per tile) than --data-path, with a warning instead of an error."""


@dataclass
class TrainConfig:
    """The loop: batch sizes, length, logging, evaluation and exit conditions."""

    train_iters: int = 1000
    """Optimizer steps to run."""
    train_samples: Optional[int] = None
    """Megatron-LM's --train-samples: rows to train on; sets train_iters to
    train_samples / global_batch_size (excludes --train-iters)."""
    global_batch_size: int = 8
    """Rows per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Rows per forward pass on one rank."""
    balance_dp: bool = True
    """Assign each global batch's rows to data-parallel ranks so their modelled ViT + LM FLOPs
    are even (training/balance.py) instead of in contiguous slices; same rows, same loss."""
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
    tensorboard_log_interval: int = 1
    """Megatron-LM's --tensorboard-log-interval: steps between TensorBoard / W&B scalar writes."""
    log_throughput: bool = False
    """Megatron-LM's --log-throughput: tokens/s, TFLOP/s/GPU and MFU in the console line
    (metrics.jsonl, TensorBoard and W&B always have them)."""
    wandb_project: Optional[str] = None
    """Megatron-LM's --wandb-project: log the TensorBoard scalars to this W&B project too
    (None: no W&B). WANDB_MODE=offline writes the run locally with no network."""
    wandb_exp_name: Optional[str] = None
    """Megatron-LM's --wandb-exp-name: the W&B run name (None: the run directory's name)."""
    log_images: int = 0
    """Sample images per log line as TensorBoard image summaries (each image's thumbnail or
    only tile, beside its sample's text), from the step's first micro-batch; 0: none."""
    wandb_save_dir: Optional[str] = None
    """Megatron-LM's --wandb-save-dir: W&B writes under <dir>/wandb/ (None: the run dir)."""
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
    recompute_method: Optional[str] = None
    """Megatron-LM's --recompute-method with full recompute: uniform (checkpoint groups of
    recompute_num_layers layers) or block (checkpoint the first recompute_num_layers layers of
    each pipeline stage); None: uniform."""
    recompute_num_layers: Optional[int] = None
    """Megatron-LM's --recompute-num-layers (see recompute_method); None: 1."""
    recompute_vit: bool = False
    """Full activation recompute of the ViT layers."""
    transformer_impl: Optional[str] = None
    """Megatron-LM's --transformer-impl: local (torch modules, runs everywhere) or
    transformer_engine (needs TE and CUDA); None: TE when it is usable, else local."""
    progress_bar: bool = False
    """Print a one-line progress bar (quickstart)."""
