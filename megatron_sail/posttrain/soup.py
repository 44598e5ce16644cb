"""Model soup: a weighted average of checkpoints that share one architecture and tokenizer.

SAIL-VL2 merges its SFT phases this way ("model soup") before LongCoT SFT. Inputs may be
training checkpoints (a run folder or one ``iter_N``) or converted ones (hf-to-mcore, compose,
an earlier soup), saved at any TP/PP: each is resharded to one rank by Megatron's
dist_checkpointing when it is read, so the average is taken over full tensors.

Refusals come before any tensor is read, each naming what differs:

* the model configs (field by field) and every stored tensor's global shape, from each
  checkpoint's DCP metadata (so a hand-edited model_config.yaml still cannot hide a changed
  tensor: its key and both shapes are named);
* the tokenizer: the tokenizer block a training checkpoint records (identity hash, special ids,
  tile geometry) or, for converted checkpoints, the bytes of ``tokenizer/``.

The result is a converted-style checkpoint (model_config.yaml, tokenizer/, processor.json and
source_files/ of the first input, manifest.json, soup.json naming inputs and weights), written
under a temporary name and renamed when complete. It loads with --init-from, generation and
mcore-to-hf like any converted checkpoint. Averaging runs in float32 and is cast back to the
model dtype; non-float tensors (TE extra state) are taken from the first input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_sail.checkpoint.layout import (
    DCP_METADATA,
    HF_CONFIG_FILE,
    PROCESSOR_FILE,
    SOURCE_DIR,
    STATE_FILE,
    TOKENIZER_DIR,
)
from megatron_sail.hashing import tree_sha256

SOUP_FILE = "soup.json"
_COPIED = (TOKENIZER_DIR, PROCESSOR_FILE, SOURCE_DIR, HF_CONFIG_FILE)


@dataclass
class SoupConfig:
    """One merge."""

    inputs: Sequence[str]
    """Checkpoint folders (run dirs resolve to their latest iteration)."""
    out: str
    """Output folder (refused when it exists and is not empty, unless ``overwrite``)."""
    weights: Optional[Sequence[float]] = None
    """Weight per input; None: uniform. Normalized to sum 1; negative weights refused."""
    overwrite: bool = False
    """Replace an existing output folder."""


class SoupMismatch(ValueError):
    """Inputs that cannot be averaged (architecture, tensor shape or tokenizer differ)."""


def resolve_inputs(paths: Sequence[str]) -> list[Path]:
    """Each input as the checkpoint folder that holds its weights."""
    from megatron_sail.checkpoint.layout import resolve_checkpoint

    out = []
    for p in paths:
        ckpt = resolve_checkpoint(str(p)) if os.path.isdir(p) else None
        if ckpt is None:
            raise FileNotFoundError(f"--inputs {p}: not a checkpoint folder (no metadata.json, no `latest`)")
        out.append(Path(ckpt))
    return out


def normalized_weights(weights: Optional[Sequence[float]], n: int) -> list[float]:
    """Weights summing to 1 (uniform when None); refuses a wrong count or negative / zero sum."""
    if n < 2:
        raise ValueError(f"--inputs: a soup needs at least 2 checkpoints, got {n}")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"--weights: {len(weights)} weights for {n} inputs")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--weights {list(weights)}: must be >= 0 with a positive sum")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def tensor_shapes(ckpt: Path) -> dict[str, tuple]:
    """Global shape of every model tensor in a dist checkpoint, read from DCP's ``.metadata``
    with the integrity module's allow-listed unpickler (optimizer entries are skipped)."""
    from megatron_sail.checkpoint import integrity

    meta = integrity.check_dcp_metadata(str(ckpt))
    if meta is None:
        raise FileNotFoundError(f"{ckpt}: no {DCP_METADATA} (not a distributed checkpoint)")
    shapes = {}
    for key, info in meta.state_dict_metadata.items():
        size = getattr(info, "size", None)
        if size is None or key.startswith("optimizer."):
            continue
        shapes[key] = tuple(size)
    return shapes


def tokenizer_identity(ckpt: Path) -> dict:
    """What identifies the tokenizer of a checkpoint: the recorded tokenizer block (training
    checkpoints) or a hash of its tokenizer/ files (converted ones); {} when it has neither."""
    from megatron_sail.checkpoint.layout import read_state_file

    state = ckpt / STATE_FILE
    if state.is_file():
        block = (read_state_file(str(state)).get("train_state") or {}).get("tokenizer") or {}
        if block:
            return dict(block)
    tok = ckpt / TOKENIZER_DIR
    if tok.is_dir():
        return {"tokenizer_files_sha256": tree_sha256(tok)}
    return {}


def check_compatible(ckpts: list[Path]) -> None:
    """Refuse, naming the field / tensor / tokenizer entry, inputs that cannot be averaged."""
    from megatron_sail.checkpoint.layout import read_model_config

    first = ckpts[0]
    base_cfg = dataclasses.asdict(read_model_config(first))
    base_cfg["vision"].pop("drop_path_rate", None)  # no weights: training-only setting
    base_shapes, base_tok = tensor_shapes(first), tokenizer_identity(first)
    for other in ckpts[1:]:
        cfg = dataclasses.asdict(read_model_config(other))
        cfg["vision"].pop("drop_path_rate", None)
        diffs = _dict_diffs(base_cfg, cfg)
        if diffs:
            raise SoupMismatch(f"{other}: model config differs from {first}: " + "; ".join(diffs))
        shapes = tensor_shapes(other)
        for key in sorted(set(base_shapes) | set(shapes)):
            a, b = base_shapes.get(key), shapes.get(key)
            if a != b:
                raise SoupMismatch(f"tensor {key}: shape {a} in {first} but {b} in {other}")
        tok = tokenizer_identity(other)
        for key in sorted(set(base_tok) & set(tok)):
            if base_tok[key] != tok[key]:
                raise SoupMismatch(
                    f"tokenizer differs: {key} is {base_tok[key]!r} in {first} but {tok[key]!r} in {other}"
                )
        if bool(base_tok) != bool(tok) or (base_tok and not set(base_tok) & set(tok)):
            raise SoupMismatch(
                f"tokenizer of {first} ({sorted(base_tok) or 'none recorded'}) "
                f"and of {other} ({sorted(tok) or 'none recorded'}) cannot be "
                "compared; merge checkpoints of the same kind or add tokenizer/"
            )


def _dict_diffs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """'field: x vs y' for each nested field that differs."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _dict_diffs(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} vs {vb!r}")
    return out


def _single_rank_model(ckpt: Path):
    """A TP=PP=1 model of the checkpoint's config (starts one-process Megatron groups)."""
    import torch.distributed as dist

    from megatron_sail.checkpoint.layout import read_model_config
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert.checkpoint import build_model_chunks
    from megatron_sail.platform import distributed

    if dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError("merge_checkpoints runs in a single process (no torchrun)")
    distributed.initialize(ParallelConfig())
    [model] = build_model_chunks(read_model_config(ckpt), ParallelConfig(), use_te=False)
    return model


def average(ckpts: list[Path], weights: list[float]) -> tuple[torch.nn.Module, dict]:
    """Load each checkpoint into one TP=1 model in turn; returns the model holding the weighted
    mean (float tensors) and the float32 sums it was made from."""
    from megatron_sail.checkpoint import dcp as dist_ckpt

    model = _single_rank_model(ckpts[0])
    sums: dict[str, torch.Tensor] = {}
    for ckpt, w in zip(ckpts, weights):
        dist_ckpt.load_model([model], ckpt)
        for key, t in model.state_dict().items():
            if not isinstance(t, torch.Tensor) or not torch.is_floating_point(t):
                continue
            acc = sums.setdefault(key, torch.zeros(t.shape, dtype=torch.float32))
            acc.add_(t.detach().float().cpu(), alpha=w)
    dist_ckpt.load_model([model], ckpts[0])  # non-float entries (extra state) of the first
    with torch.no_grad():
        params = model.state_dict(keep_vars=True)
        for key, acc in sums.items():
            params[key].copy_(acc.to(params[key].dtype))
    return model, sums


def merge(cfg: SoupConfig) -> Path:
    """Check, average and write the soup; returns the output folder."""
    from megatron_sail.checkpoint import dcp as dist_ckpt
    from megatron_sail.checkpoint import integrity
    from megatron_sail.checkpoint.layout import read_model_config, write_model_config
    from megatron_sail.convert import hf_io

    ckpts = resolve_inputs(cfg.inputs)
    weights = normalized_weights(cfg.weights, len(ckpts))
    out = Path(cfg.out).resolve()
    for c in ckpts:
        if out == c.resolve() or out in c.resolve().parents:
            raise ValueError(f"--out {cfg.out} would replace input {c}")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"--out {cfg.out}: exists and is not empty (use --overwrite)")
    check_compatible(ckpts)
    model, _ = average(ckpts, weights)
    with hf_io.atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        dist_ckpt.save_sharded(dist_ckpt.model_sharded_state_dict([model]), tmp)
        write_model_config(tmp, read_model_config(ckpts[0]))
        for name in _COPIED:
            src = ckpts[0] / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.is_file():
                shutil.copy2(src, tmp / name)
        record = {
            "inputs": [str(c) for c in ckpts],
            "weights": weights,
            "tokenizer": tokenizer_identity(ckpts[0]),
        }
        (tmp / SOUP_FILE).write_text(json.dumps(record, indent=2) + "\n")
        integrity.write_manifest(str(tmp))
    return out
