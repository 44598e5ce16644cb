"""The model config of a run that starts from a checkpoint, and its check before step 1.

A converted Hugging Face checkpoint (tools/convert_checkpoint.py hf-to-mcore writes
``model_config.yaml``) or a trainer checkpoint (its run config in ``train_state.pt``) knows its
model. ``resolve`` (config.run.resolve asking ``checkpoint_model``) takes that model when
``--recipe`` is not given or with ``--use-checkpoint-args``; otherwise the recipe's model
stands, and ``check_model`` compares it with the checkpoint's once the data has set its share
(vocab, <IMG_CONTEXT> id), before the model is built: a field that shapes a weight differs -> an
error naming both values (instead of a shape traceback inside the load); any other field (norm
eps, RoPE base, ...) -> a note, since a recipe may change those on purpose.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

from megatron_sail.checkpoint.layout import read_model_config, resolve_checkpoint
from megatron_sail.config import run
from megatron_sail.config.model import ModelConfig
from megatron_sail.config.run import RunConfig, flatten
from megatron_sail.config.train import CheckpointConfig

IGNORED_MODEL_FIELDS = {"img_context_token_id", "vision.drop_path_rate"}
"""Model fields that may differ from a checkpoint: the trainer takes <IMG_CONTEXT>'s id from the
data, and drop-path is a training-time regularizer with no weights."""
SHAPE_FIELDS = frozenset(
    {
        "family",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "ffn_hidden_size",
        "vocab_size",
        "patch_size",
        "image_size",
        "downsample_ratio",
        "kv_channels",
        "qkv_bias",
        "qk_norm",
        "tie_embeddings",
        "norm_type",
    }
)
"""Model fields (by last name) that decide which weights exist and their shapes."""


def checkpoint_to_load(c: CheckpointConfig) -> tuple[Optional[str], Optional[str]]:
    """(flag, checkpoint dir) of what the trainer will load: --load when it holds a
    checkpoint, else --init-from; (None, None) for a fresh start."""
    for flag, path in (("--load", c.load), ("--init-from", c.init_from)):
        if path and os.path.isdir(path):
            ckpt = resolve_checkpoint(path)
            if ckpt:
                return flag, ckpt
    return None, None


def checkpoint_model(c: CheckpointConfig) -> Optional[tuple[str, ModelConfig]]:
    """(checkpoint dir, its ModelConfig) of what the trainer will load; None for a fresh start."""
    _, ckpt = checkpoint_to_load(c)
    if ckpt is None:
        return None
    from megatron_sail.checkpoint import integrity  # here: resolution stays free of torch's import

    integrity.check_listing(ckpt)  # unlisted files: refused before the first read
    return ckpt, read_model_config(ckpt)


def resolve(argv: Optional[list[str]] = None) -> RunConfig:
    """The RunConfig of a trainer command line (config.run.resolve), with the model of the
    --load / --init-from checkpoint where the flags ask for it."""
    return run.resolve(argv, checkpoint_model=checkpoint_model)


def model_differences(ours: ModelConfig, theirs: ModelConfig) -> list[tuple[str, object, object]]:
    """(field, ours, checkpoint's) for every model field that differs, ignoring what the
    trainer takes from the data or does not store as weights (IGNORED_MODEL_FIELDS)."""
    a, b = flatten(dataclasses.asdict(ours)), flatten(dataclasses.asdict(theirs))
    return [
        (k, a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if k not in IGNORED_MODEL_FIELDS and a.get(k) != b.get(k)
    ]


def check_model(cfg: RunConfig, log: Callable[[str], None] = print) -> None:
    """Before the model is built: the run's model against the checkpoint it will load."""
    flag, ckpt = checkpoint_to_load(cfg.checkpoint)
    if ckpt is None:
        return
    diffs = model_differences(cfg.model, read_model_config(ckpt))
    shape = [d for d in diffs if d[0].rsplit(".", 1)[-1] in SHAPE_FIELDS]
    if shape:
        text = "; ".join(f"{k}: run {a!r}, checkpoint {b!r}" for k, a, b in shape)
        raise ValueError(
            f"{flag} {ckpt}: its model does not match recipe {cfg.recipe!r} "
            f"(and --config): {text}. Leave out --recipe (or add "
            "--use-checkpoint-args) to take the checkpoint's model"
        )
    for k, a, b in diffs:
        log(
            f"[train] {flag} {ckpt}: {k} is {a!r} in this run, {b!r} in the checkpoint "
            "(no weight depends on it; the run's value is used)"
        )
