"""Help text of the trainer's flags, taken from the config fields they set.

Every config field carries a docstring right under it (Megatron-Core's style); ``--help`` shows
its first sentence, the field's default and the accepted values, under the groups Megatron-LM
uses (data, training, learning rate, ...), so that the help and the code cannot drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
from typing import Optional

from megatron_sail.config.eval import BenchmarkEvalConfig
from megatron_sail.config.images import ImageConfig
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.config.posttrain import PostTrainConfig
from megatron_sail.config.stage import StageConfig
from megatron_sail.config.train import CheckpointConfig, DataConfig, OptimConfig, TrainConfig

SECTIONS = {
    "data": DataConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "parallel": ParallelConfig,
    "images": ImageConfig,
    "eval": BenchmarkEvalConfig,
    "stage": StageConfig,
    "post": PostTrainConfig,
}
"""Flag section -> the dataclass whose field the flag sets."""

CHOICES: dict[str, tuple[str, ...]] = {
    "--data-verify": ("cheap", "full"),
    "--fp8-format": ("hybrid", "e4m3"),
    "--fp8-recipe": ("delayed", "tensorwise"),
    "--recompute-granularity": ("selective", "full"),
    "--recompute-method": ("uniform", "block"),
    "--transformer-impl": ("local", "transformer_engine"),
    "--lr-decay-style": ("cosine", "WSD", "linear", "constant"),
    "--lr-wsd-decay-style": ("cosine", "linear", "exponential", "minus_sqrt"),
    "--ckpt-format": ("torch_dist",),
    "--ckpt-verify": ("auto", "sizes", "full"),
    "--pref-loss": ("dpo", "ipo", "mpo"),
    "--grpo-loss-level": ("token", "sequence"),
}
"""Accepted values of the string flags (config/run.py checks them after merging the YAML)."""

EXTRA_HELP = {
    "--num-layers-per-virtual-pipeline-stage": "LM layers per virtual pipeline stage (interleaved 1F1B); sets the virtual stage count",
    "--use-distributed-optimizer": "shard optimizer state over data-parallel ranks (ZeRO-1)",
    "--no-use-distributed-optimizer": "keep the full optimizer state on every rank",
    "--no-balance-dp": "give data-parallel rank r the r-th contiguous slice of each global batch "
    "instead of balancing the ranks' modelled FLOPs",
}
"""Flags whose field docstring does not say it as a user needs it."""

GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("data", ("--data-path", "--valid-data-path", "--seq-length", "--data-verify", "--num-workers")),
    (
        "training",
        (
            "--train-iters",
            "--train-samples",
            "--global-batch-size",
            "--micro-batch-size",
            "--no-balance-dp",
            "--seed",
            "--exit-duration-in-mins",
            "--exit-interval",
            "--max-skipped-steps",
            "--recompute-granularity",
            "--recompute-method",
            "--recompute-num-layers",
            "--recompute-vit",
            "--transformer-impl",
        ),
    ),
    (
        "learning rate",
        (
            "--lr",
            "--min-lr",
            "--lr-warmup-iters",
            "--lr-warmup-samples",
            "--lr-warmup-fraction",
            "--lr-warmup-init",
            "--lr-decay-style",
            "--lr-decay-iters",
            "--lr-decay-samples",
            "--lr-wsd-decay-iters",
            "--lr-wsd-decay-style",
            "--vit-lr-mult",
            "--projector-lr-mult",
        ),
    ),
    (
        "regularization and optimizer",
        (
            "--weight-decay",
            "--clip-grad",
            "--adam-beta1",
            "--adam-beta2",
            "--adam-eps",
            "--use-distributed-optimizer",
            "--no-use-distributed-optimizer",
        ),
    ),
    ("mixed precision", ("--bf16", "--fp8-format", "--fp8-recipe", "--fp8-vit")),
    (
        "distributed",
        (
            "--tensor-model-parallel-size",
            "--pipeline-model-parallel-size",
            "--num-layers-per-virtual-pipeline-stage",
            "--sequence-parallel",
            "--expert-model-parallel-size",
            "--distributed-timeout-minutes",
            "--overlap-grad-reduce",
            "--overlap-param-gather",
        ),
    ),
    (
        "checkpointing",
        (
            "--save",
            "--load",
            "--init-from",
            "--finetune",
            "--no-load-optim",
            "--no-load-rng",
            "--ckpt-format",
            "--use-checkpoint-args",
            "--save-interval",
            "--keep-last",
            "--async-save",
            "--overwrite-save",
            "--exit-on-missing-checkpoint",
            "--override-opt_param-scheduler",
            "--use-checkpoint-opt_param-scheduler",
            "--ckpt-verify",
            "--allow-tokenizer-mismatch",
            "--allow-random-init",
        ),
    ),
    (
        "validation",
        (
            "--eval-interval",
            "--eval-iters",
            "--eval-benchmark",
            "--eval-benchmark-interval",
            "--eval-benchmark-limit",
            "--eval-benchmark-at",
        ),
    ),
    (
        "logging",
        (
            "--run-dir",
            "--log-interval",
            "--tensorboard-dir",
            "--tensorboard-log-interval",
            "--log-throughput",
            "--wandb-project",
            "--wandb-exp-name",
            "--wandb-save-dir",
            "--log-images",
            "--progress-bar",
        ),
    ),
    ("stage (trainable parts)", ("--train-vision", "--train-projector", "--train-language")),
    (
        "post-training (--stage dpo / grpo)",
        (
            "--image-root",
            "--pref-loss",
            "--dpo-beta",
            "--mpo-weights",
            "--ref-load",
            "--ref-logps",
            "--num-generations",
            "--max-new-tokens",
            "--temperature",
            "--top-p",
            "--clip-eps",
            "--kl-coef",
            "--grpo-loss-level",
            "--ppo-epochs",
            "--reward",
            "--reward-weights",
            "--length-target",
            "--length-penalty",
            "--judge-url",
            "--judge-model",
            "--prompt-suffix",
        ),
    ),
]
"""Megatron-LM's argument groups, in its order; a flag in no group lands in "other"."""


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} of a dataclass, read from its source (the string right under
    each field; Python keeps no such docstrings at run time)."""
    tree = ast.parse(inspect.getsource(inspect.getmodule(cls)))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs, body = {}, node.body
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence (not '0.5' or 'e.g.')."""
    match = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
    return text[: match.start()] if match else text.rstrip(".")


def field_default(cls: type, name: str) -> Optional[str]:
    """The dataclass default of a field as text (None when it has none or it is empty)."""
    f = {f.name: f for f in dataclasses.fields(cls)}.get(name)
    if f is None:
        return None
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return None
    return None if value in (None, [], "", ()) else str(value)


def flag_help(flag: str, section: str, name: str, kind: str) -> str:
    """One line: what the flag does, its default and its choices."""
    cls = SECTIONS.get(section)
    text = EXTRA_HELP.get(flag) or (first_sentence(field_docs(cls).get(name, "")) if cls else "")
    if kind in ("flag", "noflag"):
        return text.replace("%", "%%")
    default = field_default(cls, name) if cls else None
    parts = [text] if text else []
    if flag in CHOICES:
        parts.append("one of " + ", ".join(CHOICES[flag]))
    if default is not None:
        parts.append(f"default: {default}")
    return "; ".join(parts).replace("%", "%%")  # argparse formats help with %


def metavar(name: str, kind: str) -> Optional[str]:
    """A plain metavar: the field's name in capitals (``LR``), not its config path."""
    if kind in ("flag", "noflag", "bool"):
        return None if kind != "bool" else "true|false"
    return name.upper()


def group_of(flag: str) -> str:
    """The Megatron-LM group a flag is listed under."""
    return next((title for title, flags in GROUPS if flag in flags), "other")
