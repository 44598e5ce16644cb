"""How one run's RunConfig (config/run_config.py) is resolved from its command line.

Resolution order (later wins): recipe(stage) -> YAML file (--config) -> command-line flags ->
the checkpoint's model where asked for (``--use-checkpoint-args``, or no ``--recipe``) ->
derived fields (warmup from the stage's fraction, parallel sizes checked). The resolved config is
written to ``<run_dir>/config.yaml`` so a run can be reproduced from its directory alone.

This module reads no checkpoint: ``resolve`` takes a ``checkpoint_model`` function, and
``checkpoint/from_checkpoint.py``'s ``resolve`` passes the one that reads the --load /
--init-from checkpoint. The result is a frozen RunConfig; later steps that reconcile it with the
data (train.match_data) return a new one (``dataclasses.replace``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import replace
from typing import Any, Callable, Optional

import yaml

from megatron_sail.config import recipes
from megatron_sail.config.model import ModelConfig
from megatron_sail.config.run_config import RunConfig
from megatron_sail.config.train import CheckpointConfig

log = logging.getLogger(__name__)


# Command-line flags: (flag, section, field, kind). Names follow Megatron-LM where one exists.
FLAGS: list[tuple[str, str, str, str]] = [
    ("--data-path", "data", "data_path", "list"),
    ("--valid-data-path", "data", "valid_data_path", "list"),
    ("--seq-length", "data", "seq_length", "int"),
    ("--data-verify", "data", "data_verify", "str"),
    ("--train-iters", "train", "train_iters", "int"),
    ("--train-samples", "train", "train_samples", "int"),
    ("--global-batch-size", "train", "global_batch_size", "int"),
    ("--micro-batch-size", "train", "micro_batch_size", "int"),
    ("--no-balance-dp", "train", "balance_dp", "noflag"),
    ("--seed", "train", "seed", "int"),
    ("--log-interval", "train", "log_interval", "int"),
    ("--eval-interval", "train", "eval_interval", "int"),
    ("--eval-iters", "train", "eval_iters", "int"),
    ("--eval-benchmark", "eval", "benchmarks", "append"),
    ("--eval-benchmark-interval", "eval", "interval", "int"),
    ("--eval-benchmark-limit", "eval", "limit", "int"),
    ("--eval-benchmark-at", "eval", "at_iterations", "ints"),
    ("--run-dir", "train", "run_dir", "str"),
    ("--tensorboard-dir", "train", "tensorboard_dir", "str"),
    ("--tensorboard-log-interval", "train", "tensorboard_log_interval", "int"),
    ("--log-throughput", "train", "log_throughput", "flag"),
    ("--wandb-project", "train", "wandb_project", "str"),
    ("--wandb-exp-name", "train", "wandb_exp_name", "str"),
    ("--wandb-save-dir", "train", "wandb_save_dir", "str"),
    ("--log-images", "train", "log_images", "int"),
    ("--num-workers", "images", "threads", "int"),
    ("--exit-duration-in-mins", "train", "exit_duration_in_mins", "float"),
    ("--exit-interval", "train", "exit_interval", "int"),
    ("--max-skipped-steps", "train", "max_skipped_steps", "int"),
    ("--bf16", "train", "bf16", "flag"),
    ("--fp8-format", "train", "fp8_format", "str"),
    ("--fp8-recipe", "train", "fp8_recipe", "str"),
    ("--fp8-vit", "train", "fp8_vit", "flag"),
    ("--recompute-granularity", "train", "recompute_granularity", "str"),
    ("--recompute-method", "train", "recompute_method", "str"),
    ("--recompute-num-layers", "train", "recompute_num_layers", "int"),
    ("--recompute-vit", "train", "recompute_vit", "flag"),
    ("--transformer-impl", "train", "transformer_impl", "str"),
    ("--progress-bar", "train", "progress_bar", "flag"),
    ("--tensor-model-parallel-size", "parallel", "tp", "int"),
    ("--pipeline-model-parallel-size", "parallel", "pp", "int"),
    ("--num-layers-per-virtual-pipeline-stage", "derived", "layers_per_virtual_stage", "int"),
    ("--sequence-parallel", "parallel", "sp", "flag"),
    ("--expert-model-parallel-size", "parallel", "ep", "int"),
    ("--distributed-timeout-minutes", "parallel", "distributed_timeout_minutes", "int"),
    ("--overlap-grad-reduce", "parallel", "overlap_grad_reduce", "flag"),
    ("--overlap-param-gather", "parallel", "overlap_param_gather", "flag"),
    ("--lr", "optim", "lr", "float"),
    ("--min-lr", "optim", "min_lr", "float"),
    ("--lr-warmup-iters", "optim", "lr_warmup_iters", "int"),
    ("--lr-warmup-samples", "optim", "lr_warmup_samples", "int"),
    ("--lr-warmup-fraction", "optim", "lr_warmup_fraction", "float"),
    ("--lr-warmup-init", "optim", "lr_warmup_init", "float"),
    ("--lr-decay-style", "optim", "lr_decay_style", "str"),
    ("--lr-decay-iters", "optim", "lr_decay_iters", "int"),
    ("--lr-decay-samples", "optim", "lr_decay_samples", "int"),
    ("--lr-wsd-decay-iters", "optim", "lr_wsd_decay_iters", "int"),
    ("--lr-wsd-decay-style", "optim", "lr_wsd_decay_style", "str"),
    ("--weight-decay", "optim", "weight_decay", "float"),
    ("--clip-grad", "optim", "clip_grad", "float"),
    ("--adam-beta1", "optim", "adam_beta1", "float"),
    ("--adam-beta2", "optim", "adam_beta2", "float"),
    ("--adam-eps", "optim", "adam_eps", "float"),
    ("--vit-lr-mult", "optim", "vit_lr_mult", "float"),
    ("--projector-lr-mult", "optim", "projector_lr_mult", "float"),
    ("--use-distributed-optimizer", "optim", "use_distributed_optimizer", "flag"),
    ("--no-use-distributed-optimizer", "optim", "use_distributed_optimizer", "noflag"),
    ("--save", "checkpoint", "save", "str"),
    ("--load", "checkpoint", "load", "str"),
    ("--init-from", "checkpoint", "init_from", "str"),
    ("--finetune", "checkpoint", "finetune", "flag"),
    ("--no-load-optim", "checkpoint", "no_load_optim", "flag"),
    ("--no-load-rng", "checkpoint", "no_load_rng", "flag"),
    ("--ckpt-format", "checkpoint", "ckpt_format", "str"),
    ("--use-checkpoint-args", "checkpoint", "use_checkpoint_args", "flag"),
    ("--save-interval", "checkpoint", "save_interval", "int"),
    ("--keep-last", "checkpoint", "keep_last", "int"),
    ("--async-save", "checkpoint", "async_save", "flag"),
    ("--overwrite-save", "checkpoint", "overwrite_save", "flag"),
    ("--exit-on-missing-checkpoint", "checkpoint", "exit_on_missing_checkpoint", "flag"),
    ("--override-opt_param-scheduler", "checkpoint", "override_opt_param_scheduler", "flag"),
    ("--use-checkpoint-opt_param-scheduler", "checkpoint", "use_checkpoint_opt_param_scheduler", "flag"),
    ("--ckpt-verify", "checkpoint", "ckpt_verify", "str"),
    ("--allow-tokenizer-mismatch", "checkpoint", "allow_tokenizer_mismatch", "flag"),
    ("--allow-random-init", "checkpoint", "allow_random_init", "flag"),
    ("--train-vision", "stage", "train_vision", "bool"),
    ("--train-projector", "stage", "train_projector", "bool"),
    ("--train-language", "stage", "train_language", "bool"),
    # post-training stages (config/posttrain.py)
    ("--image-root", "post", "image_root", "str"),
    ("--pref-loss", "post", "pref_loss", "str"),
    ("--dpo-beta", "post", "dpo_beta", "float"),
    ("--mpo-weights", "post", "mpo_weights", "floats"),
    ("--ref-load", "post", "ref_load", "str"),
    ("--ref-logps", "post", "ref_logps", "str"),
    ("--num-generations", "post", "num_generations", "int"),
    ("--max-new-tokens", "post", "max_new_tokens", "int"),
    ("--temperature", "post", "temperature", "float"),
    ("--top-p", "post", "top_p", "float"),
    ("--clip-eps", "post", "clip_eps", "float"),
    ("--kl-coef", "post", "kl_coef", "float"),
    ("--grpo-loss-level", "post", "loss_level", "str"),
    ("--ppo-epochs", "post", "ppo_epochs", "int"),
    ("--reward", "post", "rewards", "list"),
    ("--reward-weights", "post", "reward_weights", "floats"),
    ("--length-target", "post", "length_target", "int"),
    ("--length-penalty", "post", "length_penalty", "float"),
    ("--judge-url", "post", "judge_url", "str"),
    ("--judge-model", "post", "judge_model", "str"),
    ("--prompt-suffix", "post", "prompt_suffix", "str"),
]

_KINDS = {"int": int, "float": float, "str": str}


ALIASES = {
    "--tensor-model-parallel-size": ("--tp",),
    "--pipeline-model-parallel-size": ("--pp",),
    "--expert-model-parallel-size": ("--ep",),
}
"""Short spellings accepted beside Megatron-LM's long ones (generate and convert take both too)."""

MEGATRON_MULTIMODAL = [
    ("--freeze-ViT", "stage.train_vision", "store_const", "same as --train-vision false"),
    ("--freeze-LM", "stage.train_language", "store_const", "same as --train-language false"),
    (
        "--pretrained-checkpoint",
        "checkpoint.init_from",
        "store",
        "Megatron-LM multimodal's spelling of --init-from (weights only, iterations from 0)",
    ),
]
"""Megatron-LM's examples/multimodal flags, mapped to ours."""

HELP_EPILOG = (
    "Defaults shown are the components' own; --recipe and --stage set theirs on top, then "
    "--config, then flags. `python -m megatron_sail.training.dry_run -- [flags]` prints "
    "the resolved config and checks data and checkpoints without training."
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m megatron_sail.train``; every override defaults to None
    so that only flags actually given change the config. Help text comes from the config
    fields' docstrings (config/flag_help.py), grouped as Megatron-LM groups its flags."""
    from megatron_sail.config import flag_help
    from megatron_sail.config.recipes import RECIPES
    from megatron_sail.config.stage import STAGES

    # allow_abbrev=False: as in Megatron-LM, `--lr-warmu 5` is an error, not --lr-warmup-*.
    p = argparse.ArgumentParser(
        prog="megatron_sail.train", description=__doc__, epilog=HELP_EPILOG, allow_abbrev=False
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--recipe",
        default=None,
        metavar="NAME",
        help=f"model and defaults, one of {', '.join(RECIPES)} (default: tiny; with "
        "--load / --init-from and no --recipe the model comes from the checkpoint)",
    )
    run.add_argument(
        "--stage",
        default=None,
        metavar="NAME",
        help=f"training stage, one of {', '.join(STAGES)} (default: the recipe's)",
    )
    run.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML file overriding recipe fields (flags override it)",
    )
    run.add_argument(
        "--split",
        default=None,
        metavar="SPLIT",
        help="not supported (Megatron-LM's train/valid split): give --valid-data-path",
    )
    groups = {title: p.add_argument_group(title) for title, _ in flag_help.GROUPS}
    for flag, section, name, kind in FLAGS:
        g = groups.get(flag_help.group_of(flag)) or groups.setdefault("other", p.add_argument_group("other"))
        names = (flag, *ALIASES.get(flag, ()))
        common = dict(
            dest=f"{section}.{name}",
            default=None,
            help=flag_help.flag_help(flag, section, name, kind) or None,
        )
        if kind in ("flag", "noflag"):
            g.add_argument(*names, action="store_const", const=kind == "flag", **common)
            continue
        common["metavar"] = flag_help.metavar(name, kind)
        if kind == "bool":
            g.add_argument(*names, type=_parse_bool, **common)
        elif kind == "list":
            g.add_argument(*names, nargs="+", **common)
        elif kind == "ints":  # --eval-benchmark-at 8 16 32
            g.add_argument(*names, nargs="+", type=int, **common)
        elif kind == "floats":  # --reward-weights 1.0 0.5
            g.add_argument(*names, nargs="+", type=float, **common)
        elif kind == "append":  # repeatable: --eval-benchmark A=x --eval-benchmark B=y
            g.add_argument(*names, action="append", **common)
        else:
            g.add_argument(*names, type=_KINDS[kind], **common)
    mm = p.add_argument_group("Megatron-LM multimodal spellings")
    for flag, dest, action, text in MEGATRON_MULTIMODAL:
        if action == "store_const":
            mm.add_argument(flag, dest=dest, action="store_const", const=False, default=None, help=text)
        else:
            mm.add_argument(flag, dest=dest, default=None, metavar="DIR", help=text)
    return p


def _parse_bool(text: str) -> bool:
    """Parse true/false style values of boolean flags."""
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def apply_overrides(obj: Any, overrides: dict, origin: str) -> Any:
    """Set nested dataclass fields from a nested dict, refusing unknown keys and wrong types
    (``origin`` names the file or flag source in the error). Returns the result: ``obj``
    itself, changed in place, or a changed copy when ``obj`` is frozen (a RunConfig)."""
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(
                f"{origin}: unknown key {key!r} in {type(obj).__name__}; known: {', '.join(sorted(names))}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changed = apply_overrides(current, value, f"{origin}:{key}")
            if changed is not current:
                changes[key] = changed
            continue
        changes[key] = _checked(current, value, f"{origin}:{key}")
    if type(obj).__dataclass_params__.frozen:
        return replace(obj, **changes) if changes else obj
    for key, value in changes.items():
        setattr(obj, key, value)
    return obj


def _checked(current: Any, value: Any, where: str) -> Any:
    """Return value converted to the type of the current value, or raise naming the key."""
    if value is None or current is None:
        return value
    if isinstance(current, bool) or isinstance(value, bool):
        if isinstance(current, bool) and isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected {type(current).__name__}, got {value!r}")
    if isinstance(current, float) and isinstance(value, (int, float)):
        return float(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(current)(value)
    if isinstance(current, dict) and isinstance(value, dict):
        return value
    if not isinstance(value, type(current)):
        raise ValueError(f"{where}: expected {type(current).__name__}, got {value!r}")
    return value


def load_yaml(path: str) -> dict:
    """Read a YAML override file; it must hold a mapping of section -> fields."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def flag_overrides(args: argparse.Namespace) -> dict:
    """Collect the flags that were given into a nested {section: {field: value}} dict."""
    out: dict = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, name = dest.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def finalize(cfg: RunConfig) -> RunConfig:
    """Fill derived fields and check combinations that would fail later with a worse message."""
    _check_counts(cfg)
    cfg = _check_megatron_flags(cfg)
    t, o = cfg.train, cfg.optim
    _apply_samples(cfg)
    if o.lr_decay_iters is None:
        o.lr_decay_iters = max(1, t.train_iters)  # the scheduler needs >= 1 (--train-iters 0)
    if o.lr_warmup_fraction is not None:  # Megatron-LM: a fraction of the decay steps
        o.lr_warmup_iters = int(round(o.lr_warmup_fraction * o.lr_decay_iters))
    if o.lr_warmup_iters is None:
        o.lr_warmup_iters = int(round(cfg.stage.warmup_fraction * t.train_iters))
    if o.lr_warmup_iters >= o.lr_decay_iters:
        o.lr_warmup_iters = max(0, o.lr_decay_iters - 1)
    if o.lr_decay_style == "WSD" and o.lr_wsd_decay_iters is None:
        o.lr_wsd_decay_iters = max(1, o.lr_decay_iters // 10)
    if o.lr_decay_style not in ("cosine", "WSD", "linear", "constant"):
        raise ValueError(f"--lr-decay-style {o.lr_decay_style!r}: expected cosine, WSD, linear or constant")
    if t.global_batch_size % t.micro_batch_size:
        raise ValueError(
            f"--global-batch-size {t.global_batch_size} is not a multiple of "
            f"--micro-batch-size {t.micro_batch_size}"
        )
    if t.fp8_format not in (None, "hybrid", "e4m3"):
        raise ValueError(f"--fp8-format {t.fp8_format!r}: expected hybrid or e4m3")
    if t.recompute_granularity not in (None, "selective", "full"):
        raise ValueError(f"--recompute-granularity {t.recompute_granularity!r}: expected selective or full")
    if t.tensorboard_dir is None:
        t.tensorboard_dir = os.path.join(t.run_dir, "tensorboard")
    cfg.parallel.validate()  # flags set its fields after it was made
    cfg.post.validate()
    cfg.parallel.check_experts(cfg.model.language.num_experts)
    return cfg


def _check_megatron_flags(cfg: RunConfig) -> RunConfig:
    """Values and combinations of the Megatron-LM flags, refused with the flag's name (as
    Megatron-LM's own argument checks refuse them) instead of being half honoured. Returns the
    config with what the flags imply (--overlap-param-gather turns on --overlap-grad-reduce)."""
    t, o, c, p = cfg.train, cfg.optim, cfg.checkpoint, cfg.parallel
    if c.ckpt_format != "torch_dist":
        raise ValueError(
            f"--ckpt-format {c.ckpt_format!r}: this trainer writes and reads only "
            "torch_dist (Megatron-Core dist_checkpointing); torch, torch_dcp, zarr "
            "and fsdp_dtensor are not supported"
        )
    if t.transformer_impl not in (None, "local", "transformer_engine"):
        raise ValueError(f"--transformer-impl {t.transformer_impl!r}: expected local or transformer_engine")
    if t.recompute_method not in (None, "uniform", "block"):
        raise ValueError(f"--recompute-method {t.recompute_method!r}: expected uniform or block")
    if (t.recompute_method or t.recompute_num_layers is not None) and t.recompute_granularity != "full":
        raise ValueError(
            "--recompute-method / --recompute-num-layers apply to --recompute-granularity full only"
        )
    for flag, value, least in (
        ("--recompute-num-layers", t.recompute_num_layers, 1),
        ("--tensorboard-log-interval", t.tensorboard_log_interval, 1),
        ("--log-images", t.log_images, 0),
        ("--train-samples", t.train_samples, 0),
        ("--lr-warmup-samples", o.lr_warmup_samples, 0),
        ("--lr-decay-samples", o.lr_decay_samples, 1),
    ):
        if value is not None and value < least:
            raise ValueError(f"{flag} {value}: must be at least {least}")
    if o.lr_warmup_fraction is not None:
        if not 0.0 <= o.lr_warmup_fraction <= 1.0:
            raise ValueError(f"--lr-warmup-fraction {o.lr_warmup_fraction}: must be in [0, 1]")
        if o.lr_warmup_iters is not None or o.lr_warmup_samples is not None:
            raise ValueError("--lr-warmup-fraction excludes --lr-warmup-iters and --lr-warmup-samples")
    if p.overlap_param_gather:
        if not o.use_distributed_optimizer:
            raise ValueError(
                "--overlap-param-gather needs the distributed optimizer (--use-distributed-optimizer)"
            )
        if p.overlap_grad_reduce is False:
            raise ValueError("--overlap-param-gather needs --overlap-grad-reduce")
    if c.finetune and not c.load:
        raise ValueError("--finetune loads the weights of --load; give --load (or use --init-from)")
    if p.overlap_param_gather and not p.overlap_grad_reduce:
        return replace(cfg, parallel=replace(p, overlap_grad_reduce=True))
    return cfg


def _samples_to_steps(flag: str, samples: int, batch: int) -> int:
    """Rows -> optimizer steps of ``batch`` rows. Megatron-LM counts its sample-based schedule
    in rows; with a constant global batch that is the same curve when the rows are a multiple
    of the batch, and the nearest step otherwise (said once)."""
    steps, rest = divmod(samples, batch)
    if rest:
        steps = int(round(samples / batch))
        log.warning(
            f"{flag} {samples} is not a multiple of --global-batch-size {batch}: "
            f"using {steps} steps ({steps * batch} rows)"
        )
    return steps


def _apply_samples(cfg: RunConfig) -> None:
    """Megatron-LM's sample-based run (--train-samples with --lr-decay-samples /
    --lr-warmup-samples) as step counts; the iteration forms stay exclusive with it."""
    t, o = cfg.train, cfg.optim
    if t.train_samples is None:
        for flag, value in (
            ("--lr-decay-samples", o.lr_decay_samples),
            ("--lr-warmup-samples", o.lr_warmup_samples),
        ):
            if value is not None:
                raise ValueError(
                    f"{flag} needs --train-samples (a sample-based run); with "
                    f"--train-iters use {flag.replace('samples', 'iters')}"
                )
        return
    for flag, value in (("--lr-decay-iters", o.lr_decay_iters), ("--lr-warmup-iters", o.lr_warmup_iters)):
        if value is not None:
            raise ValueError(
                f"{flag} {value} with --train-samples: give it in rows ({flag.replace('iters', 'samples')})"
            )
    g = t.global_batch_size
    t.train_iters = t.train_samples // g  # Megatron-LM: train_samples // global_batch_size
    if o.lr_decay_samples is not None:
        o.lr_decay_iters = max(1, _samples_to_steps("--lr-decay-samples", o.lr_decay_samples, g))
    if o.lr_warmup_samples is not None:
        o.lr_warmup_iters = _samples_to_steps("--lr-warmup-samples", o.lr_warmup_samples, g)


def _check_counts(cfg: RunConfig) -> None:
    """Counts that must not be negative (or zero), stated with the flag, before anything
    downstream fails on them with a bare assertion."""
    t, c = cfg.train, cfg.checkpoint
    for flag, value, least in (
        ("--train-iters", t.train_iters, 0),
        ("--global-batch-size", t.global_batch_size, 1),
        ("--micro-batch-size", t.micro_batch_size, 1),
        ("--log-interval", t.log_interval, 1),
        ("--eval-interval", t.eval_interval, 0),
        ("--eval-iters", t.eval_iters, 0),
        ("--exit-interval", t.exit_interval, 0),
        ("--save-interval", c.save_interval, 0),
        ("--keep-last", c.keep_last, 0),
    ):
        if value < least:
            raise ValueError(f"{flag} {value}: must be at least {least}")
    for flag, value, least in (
        ("--lr-warmup-iters", cfg.optim.lr_warmup_iters, 0),
        ("--lr-decay-iters", cfg.optim.lr_decay_iters, 1),
    ):
        if value is not None and value < least:
            raise ValueError(f"{flag} {value}: must be at least {least}")
    if c.ckpt_verify not in ("auto", "sizes", "full"):
        raise ValueError(f"--ckpt-verify {c.ckpt_verify!r}: expected auto, sizes or full")
    if cfg.data.data_verify not in ("cheap", "full"):
        raise ValueError(f"--data-verify {cfg.data.data_verify!r}: expected cheap or full")
    if c.override_opt_param_scheduler and c.use_checkpoint_opt_param_scheduler:
        raise ValueError(
            "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other"
        )


def random_init_problem(cfg: RunConfig, has_checkpoint: bool) -> Optional[str]:
    """Why this stage must not start from random weights, or None: a stage that trains only the
    projector (ViT and LLM frozen) learns nothing useful between two random networks, so it
    needs --init-from (or a --load checkpoint), or an explicit --allow-random-init."""
    s, c = cfg.stage, cfg.checkpoint
    if s.train_vision or s.train_language or has_checkpoint or c.init_from or c.allow_random_init:
        return None
    return (
        f"stage {s.name} trains only the projector, but no --init-from (or --load "
        "checkpoint) gives the ViT and the LLM their pretrained weights: it would connect two "
        "random networks. Give --init-from (e.g. tools/convert_checkpoint.py compose of an "
        "encoder and an LLM), or --allow-random-init for a toy run"
    )


def default_run_dir(save: Optional[str], recipe_run_dir: str) -> str:
    """Where metrics, TensorBoard and config.yaml go without --run-dir: next to the checkpoints,
    as Megatron-LM users expect (the folder above ``--save .../checkpoints``, else --save itself);
    the recipe's ``runs/<recipe>`` only when nothing is saved."""
    if not save:
        return recipe_run_dir
    save = os.path.normpath(save)
    return os.path.dirname(save) or "." if os.path.basename(save) == "checkpoints" else save


CheckpointModel = Callable[[CheckpointConfig], Optional[tuple[str, ModelConfig]]]
"""(checkpoint dir, its ModelConfig) of the checkpoint a run will load, or None (no checkpoint)."""


def resolve(
    argv: Optional[list[str]] = None, checkpoint_model: Optional[CheckpointModel] = None
) -> RunConfig:
    """Build the RunConfig of a command line: recipe(stage), then YAML, then flags, then the
    model of the checkpoint (``checkpoint_model``; None: no checkpoint is read, so
    --use-checkpoint-args is refused and without --recipe the default recipe's model stands)."""
    args = build_parser().parse_args(argv)
    if args.split is not None:
        raise ValueError(
            f"--split {args.split}: this trainer does not carve validation rows out "
            "of --data-path; preprocess the held-out data separately and pass its "
            "prefixes with --valid-data-path"
        )
    recipe = recipes.get_recipe(args.recipe or "tiny")
    cfg = recipe(args.stage) if args.stage else recipe()
    overrides = load_yaml(args.config) if args.config else {}
    if args.config:
        cfg = apply_overrides(cfg, overrides, args.config)
    flags = flag_overrides(args)
    if "train_samples" in flags.get("train", {}) and "train_iters" in flags.get("train", {}):
        raise ValueError("--train-samples and --train-iters exclude each other (Megatron-LM)")
    derived = flags.pop("derived", {})
    cfg = apply_overrides(cfg, flags, "command line")
    if "run_dir" not in flags.get("train", {}) and "run_dir" not in (overrides.get("train") or {}):
        cfg = dataclasses.replace(
            cfg,
            train=dataclasses.replace(
                cfg.train, run_dir=default_run_dir(cfg.checkpoint.save, cfg.train.run_dir)
            ),
        )
    if cfg.checkpoint.use_checkpoint_args or args.recipe is None:
        required = cfg.checkpoint.use_checkpoint_args
        if checkpoint_model is None and required:
            raise ValueError(
                "--use-checkpoint-args reads the checkpoint's model: resolve the "
                "command line with checkpoint/from_checkpoint.py's resolve"
            )
        found = checkpoint_model(cfg.checkpoint) if checkpoint_model else None
        cfg = use_checkpoint_model(cfg, found, overrides.get("model") or {}, args.config, required=required)
    if "layers_per_virtual_stage" in derived:
        cfg = set_layers_per_virtual_stage(cfg, derived["layers_per_virtual_stage"])
    return finalize(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: nested config dicts compared field by field."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def use_checkpoint_model(
    cfg: RunConfig,
    found: Optional[tuple[str, ModelConfig]],
    yaml_model: dict,
    origin: Optional[str],
    required: bool = True,
) -> RunConfig:
    """``cfg`` with the model of the checkpoint ``found`` (its folder and ModelConfig: the
    --load checkpoint, or when --load holds none yet --init-from's) instead of the recipe's:
    with Megatron-LM's --use-checkpoint-args (``required``: no checkpoint is an error), and by
    default when --recipe is not given (no checkpoint: the default recipe). A model field the
    YAML sets to another value than the checkpoint's is an error naming both; drop-path (no
    weights) stays the recipe's."""
    c = cfg.checkpoint
    if found is None:
        if not required:
            return cfg
        raise ValueError(
            f"--use-checkpoint-args: no checkpoint in --load {c.load} or --init-from {c.init_from}"
        )
    ckpt, theirs = found
    flat = flatten(dataclasses.asdict(theirs))
    clash = [
        f"{k}: {origin} {v!r}, checkpoint {flat[k]!r}"
        for k, v in flatten(yaml_model).items()
        if k in flat and k != "vision.drop_path_rate" and v != flat[k]
    ]
    if clash:
        raise ValueError(
            f"--use-checkpoint-args {ckpt}: the model config differs from the "
            "checkpoint's: " + "; ".join(clash)
        )
    vision = replace(theirs.vision, drop_path_rate=cfg.model.vision.drop_path_rate)
    return replace(cfg, model=replace(theirs, vision=vision))


def set_layers_per_virtual_stage(cfg: RunConfig, layers: int) -> RunConfig:
    """Megatron-LM's --num-layers-per-virtual-pipeline-stage, turned into our chunk count
    (ParallelConfig.vpp = LM layers / (pp * layers per virtual stage))."""
    total, pp = cfg.model.language.num_layers, cfg.parallel.pp
    if layers < 1 or total % (pp * layers):
        raise ValueError(
            f"--num-layers-per-virtual-pipeline-stage {layers}: {total} LM layers "
            f"do not split into pp={pp} x chunks of {layers}"
        )
    return replace(cfg, parallel=replace(cfg.parallel, vpp=total // (pp * layers)))


def to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict of the config (for YAML and checkpoint metadata)."""
    return dataclasses.asdict(cfg)


def write_resolved(cfg: RunConfig, run_dir: str) -> str:
    """Write the resolved config to <run_dir>/config.yaml (temporary name, then rename)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
    return path
