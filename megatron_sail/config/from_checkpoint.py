"""The model config of a run that starts from a checkpoint, and its check before step 1.

A converted Hugging Face checkpoint (tools/convert_checkpoint.py hf-to-mcore writes
``model_config.yaml``) or a trainer checkpoint (its run config in ``train_state.pt``) knows its
model. ``config.run.resolve`` takes that model when ``--recipe`` is not given or with
``--use-checkpoint-args``; otherwise the recipe's model stands, and ``check_model`` compares it
with the checkpoint's once the data has set its share (vocab, <IMG_CONTEXT> id), before the
model is built: a field that shapes a weight differs -> an error naming both values (instead
of a shape traceback inside the load); any other field (norm eps, RoPE base, ...) -> a note,
since a recipe may change those on purpose.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from megatron_sail.config.dry_run import IGNORED_MODEL_FIELDS
from megatron_sail.config.flatten import flatten

SHAPE_FIELDS = frozenset({"family", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                          "ffn_hidden_size", "vocab_size", "patch_size", "image_size",
                          "downsample_ratio", "kv_channels", "qkv_bias", "qk_norm",
                          "tie_embeddings", "norm_type"})
"""Model fields (by last name) that decide which weights exist and their shapes."""


def checkpoint_to_load(c) -> tuple[Optional[str], Optional[str]]:
    """(flag, checkpoint dir) of what the trainer will load: --load when it holds a
    checkpoint, else --init-from; (None, None) for a fresh start."""
    import os

    from megatron_sail.training.checkpoint import resolve_checkpoint

    for flag, path in (("--load", c.load), ("--init-from", c.init_from)):
        if path and os.path.isdir(path):
            ckpt = resolve_checkpoint(path)
            if ckpt:
                return flag, ckpt
    return None, None


def model_differences(ours, theirs) -> list[tuple[str, object, object]]:
    """(field, ours, checkpoint's) for every model field that differs, ignoring what the
    trainer takes from the data or does not store as weights (dry_run.IGNORED_MODEL_FIELDS)."""
    a, b = flatten(dataclasses.asdict(ours)), flatten(dataclasses.asdict(theirs))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in IGNORED_MODEL_FIELDS and a.get(k) != b.get(k)]


def check_model(cfg, log: Callable[[str], None] = print) -> None:
    """Before the model is built: the run's model against the checkpoint it will load."""
    from megatron_sail.convert.checkpoint import read_model_config

    flag, ckpt = checkpoint_to_load(cfg.checkpoint)
    if ckpt is None:
        return
    diffs = model_differences(cfg.model, read_model_config(ckpt))
    shape = [d for d in diffs if d[0].rsplit(".", 1)[-1] in SHAPE_FIELDS]
    if shape:
        text = "; ".join(f"{k}: run {a!r}, checkpoint {b!r}" for k, a, b in shape)
        raise ValueError(f"{flag} {ckpt}: its model does not match recipe {cfg.recipe!r} "
                         f"(and --config): {text}. Leave out --recipe (or add "
                         "--use-checkpoint-args) to take the checkpoint's model")
    for k, a, b in diffs:
        log(f"[train] {flag} {ckpt}: {k} is {a!r} in this run, {b!r} in the checkpoint "
            "(no weight depends on it; the run's value is used)")
