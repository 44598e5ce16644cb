"""The on-disk layout of our checkpoints: every file name, the kinds of folder, resolving a path
to one checkpoint, and reading the two files that say what a checkpoint is (its model config and
its train state).

A ``--save`` root::

    ROOT/iter_0000020/                dist checkpoint (checkpoint/dcp.py): .metadata, *.distcp,
                                      common.pt, metadata.json
    ROOT/iter_0000020/train_state.pt  TrainState and run config (rank 0)
    ROOT/iter_0000020/manifest.json   size + SHA-256 of every file (checkpoint/integrity.py)
    ROOT/iter_0000020/tokenizer/      the data's tokenizer; processor.json: tiling + template
                                      (checkpoint/assets.py)
    ROOT/latest                       "20": written last, by rename
    ROOT/.lock                        held by the run writing ROOT (training/save_dir.py)

A conversion (``hf-to-mcore``) is one such folder without ``train_state.pt``, with
``model_config.yaml``, ``hf_config.json``, ``conversion.json`` and, for layouts with unused ViT
layers, ``unused_hf_tensors.safetensors``. Every module names these files through the constants
below; none spells them out again.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable, ContextManager, Optional, TypeVar

import yaml

from megatron_sail.checkpoint import lease
from megatron_sail.config.model import ModelConfig
from megatron_sail.config.run import apply_overrides

LATEST = "latest"
"""The iteration of the newest complete checkpoint under a --save root (one decimal line)."""
LOCK_FILE = ".lock"
"""Held (flock) by the run that writes a --save root."""
STATE_FILE = "train_state.pt"
"""TrainState + run config of a training checkpoint (torch pickle, read with an allow-list)."""
MANIFEST = "manifest.json"
"""Size and SHA-256 of every other file of the folder, written last."""
MCORE_METADATA = "metadata.json"
"""Megatron's dist-checkpoint metadata: its presence makes a folder a Megatron checkpoint."""
DCP_METADATA = ".metadata"
"""torch.distributed.checkpoint's pickled metadata (read with an allow-list)."""
COMMON_FILE = "common.pt"
"""Megatron's pickled non-sharded part of a dist checkpoint."""
MODEL_CONFIG_FILE = "model_config.yaml"
"""Our ModelConfig, written by hf-to-mcore."""
HF_CONFIG_FILE = "hf_config.json"
"""The source transformers config of a conversion (fields our config does not model)."""
CONVERSION_FILE = "conversion.json"
"""Where a conversion came from, and each source tensor's dtype."""
UNUSED_FILE = "unused_hf_tensors.safetensors"
"""Source ViT layers our model does not use (after select_layer), given back on export."""
TOKENIZER_DIR = "tokenizer"
"""The training data's tokenizer, as save_pretrained writes it."""
PROCESSOR_FILE = "processor.json"
"""Tile geometry and chat template the model was trained with (checkpoint/processor.py)."""
SOURCE_DIR = "source_files"
"""Non-weight, non-tokenizer files of an HF source folder (remote code, its config.json, ...)."""
HF_CONFIG = "config.json"
"""A Hugging Face folder's config; with no MCORE_METADATA beside it the folder is 'hf'."""
HF_PREPROCESSOR_FILE = "preprocessor_config.json"
"""A Hugging Face folder's image processor settings (what transformers' AutoProcessor reads)."""
HF_GENERATION_FILE = "generation_config.json"
"""A Hugging Face folder's generation defaults."""
_ITER = re.compile(r"iter_(\d{7})")
T = TypeVar("T")
log = logging.getLogger(__name__)


class CheckpointDamaged(ValueError):
    """A checkpoint file is missing, truncated, changed, or not what its format allows."""


def iter_dir(root: str, iteration: int) -> str:
    """Directory name of one checkpoint."""
    return os.path.join(root, f"iter_{iteration:07d}")


def list_checkpoints(root: str) -> list[int]:
    """Iterations of the complete checkpoints under root, in iteration order."""
    if not os.path.isdir(root):
        return []
    its = [int(m.group(1)) for n in os.listdir(root) if (m := _ITER.fullmatch(n))]
    return sorted(its)


def read_latest(root: str) -> Optional[int]:
    """The iteration `root/latest` names; None without a `latest`. A file that is not a
    decimal iteration number (binary garbage, a partial write) is an error naming it."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(64)
    text = raw.decode("ascii", errors="replace").strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(
            f"{path}: expected an iteration number (a line like '20'), got "
            f"{raw[:32]!r}; the file is damaged: point it at one of "
            f"{[f'iter_{i:07d}' for i in list_checkpoints(root)] or 'no checkpoints'}"
        )
    return int(text)


def resolve_checkpoint(path: str) -> Optional[str]:
    """The checkpoint directory that `path` names: a root with `latest`, or one checkpoint
    (ours or a model-only HF conversion). None when `path` holds no checkpoint yet."""
    latest = os.path.join(path, LATEST)
    iteration = read_latest(path)
    if iteration is not None:
        ckpt = iter_dir(path, iteration)
        if not os.path.isdir(ckpt):
            raise FileNotFoundError(f"{latest} names iteration {iteration} but {ckpt} is missing")
        return ckpt
    if os.path.isfile(os.path.join(path, MCORE_METADATA)):
        return path
    if os.path.isfile(path):
        raise NotADirectoryError(
            f"{path}: is a file, not a checkpoint folder (expected a "
            "--save root with `latest`, or one iter_XXXXXXX folder)"
        )
    return None


PRUNE_WAIT_S = 5.0
"""How long a reader whose checkpoint failed waits for a pruner's delete to finish before it
decides whether the checkpoint was pruned (then: retry) or is damaged (then: the error)."""


def read_checkpoint(path: str, read: Callable[[str], T], attempts: int = 3) -> T:
    """``read(ckpt)`` on the checkpoint folder ``path`` resolves to, safe against a run that
    prunes it meanwhile (``--keep-last``: it publishes a newer one, moves `latest`, then deletes
    old ones). The read holds a reader's lease (checkpoint/lease.py), which the pruner respects.
    Without one (a read-only folder, or a prune between resolving and leasing), when the read
    fails because the folder was deleted under it, a --save root is
    resolved again and the new `latest` read, with a notice saying so; a folder named directly
    gives an error that says it was deleted, not that it is not a checkpoint. A ``path`` that
    resolves to no checkpoint is passed to ``read`` as it is."""
    for attempt in range(1, attempts + 1):
        ckpt = _resolve_settled(path)
        if ckpt is None:  # not one of ours: ``read`` says what it is not
            gone = pruned_note(path)
            if gone:
                raise FileNotFoundError(gone)
            return read(path)
        try:
            with reader_lease(ckpt):  # the pruner of a run saving beside it skips it
                return read(ckpt)
        except Exception:  # re-raised unless the checkpoint was pruned
            if not _pruned(ckpt):
                raise
            newer = _resolve_settled(path) if os.path.isdir(path) and path != ckpt else None
            if newer is None or newer == ckpt or attempt == attempts:
                raise FileNotFoundError(
                    f"{ckpt}: the checkpoint was deleted while being read (a run saving beside "
                    "it with --keep-last prunes older checkpoints); read a newer one, or the "
                    "--save folder itself to follow its `latest`"
                ) from None
            log.warning(
                f"{ckpt} was deleted while being read (pruned by the run saving into "
                f"{path}); reading the new latest, {newer}"
            )
    raise AssertionError("unreachable")


def pruned_note(path: str | os.PathLike) -> Optional[str]:
    """Why ``path`` is missing when it is an iter_XXXXXXX folder gone from a --save root (a run
    saving there with --keep-last pruned it): a message saying so and naming the new `latest`,
    rather than one about what kind of folder it is not; None otherwise."""
    root, name = os.path.split(os.path.abspath(path))
    if not _ITER.fullmatch(name) or os.path.exists(path) or not os.path.isfile(os.path.join(root, LATEST)):
        return None
    try:
        latest = f"iter_{read_latest(root):07d}"
    except (ValueError, TypeError):
        latest = "unreadable"
    return (
        f"{path}: no such checkpoint: it was deleted (a run saving into {root} with --keep-last "
        f"prunes older checkpoints; its `latest` is now {latest}); pass {root} to read the latest"
    )


def reader_lease(ckpt: str | os.PathLike) -> ContextManager:
    """A reader's lease (checkpoint/lease.py) on ``ckpt`` for a ``with`` block when it is an
    iter_XXXXXXX folder of a --save root (the only kind a run prunes); otherwise nothing."""
    root, name = os.path.split(os.path.abspath(ckpt))
    if _ITER.fullmatch(name) and os.path.isfile(os.path.join(root, LATEST)):
        return lease.reading(str(ckpt))
    return nullcontext()


def _resolve_settled(path: str) -> Optional[str]:
    """``resolve_checkpoint``, tolerating a `latest` that names a folder pruned just after it
    was read (a second run moved `latest` on meanwhile)."""
    for _ in range(3):
        before = read_latest(path) if os.path.isdir(path) else None
        try:
            return resolve_checkpoint(path)
        except FileNotFoundError:
            if before is None or read_latest(path) == before:
                raise
    return resolve_checkpoint(path)


def _pruned(ckpt: str) -> bool:
    """Whether ``ckpt`` is gone, or going: `latest` beside it names a newer checkpoint and the
    folder disappears within PRUNE_WAIT_S (a pruner's delete under way). A folder that stays is
    not pruned: its read error stands."""
    if not os.path.isdir(ckpt):
        return True
    root = os.path.dirname(os.path.abspath(ckpt))
    try:
        latest = read_latest(root)
    except ValueError:
        return False
    if latest is None or iter_dir(root, latest) == os.path.abspath(ckpt):
        return False
    deadline = time.monotonic() + PRUNE_WAIT_S
    while os.path.isdir(ckpt):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def checkpoint_kind(folder: str | os.PathLike) -> Optional[str]:
    """What one folder holds: 'hf' (a Hugging Face folder: config.json, no Megatron metadata),
    'train' (a training checkpoint: train_state.pt), 'mcore' (a conversion: Megatron metadata
    without a train state), or None."""
    root = Path(folder)
    if (root / HF_CONFIG).is_file() and not (root / MCORE_METADATA).is_file():
        return "hf"
    if (root / STATE_FILE).is_file():
        return "train"
    if (root / MCORE_METADATA).is_file():
        return "mcore"
    return None


def allowed_globals() -> list:
    """What a checkpoint pickle (train_state.pt, Megatron's common.pt and pickled items) may
    hold besides tensors and plain Python values: numpy's RNG state array (the numpy generator
    state in TrainState.rng). Nothing that can run code."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_state_file(path: str) -> dict:
    """Read a train_state.pt with ``weights_only=True`` and the allow-list above: a crafted
    pickle that names any other callable is refused before it runs (error names the file)."""
    import torch  # here: resolving and kind detection stay free of torch's import time

    try:
        with torch.serialization.safe_globals(allowed_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
        raise CheckpointDamaged(
            f"{path}: refusing to unpickle it: it holds something a train state never does ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointDamaged(f"{path}: unreadable train state ({e})") from None
    if not isinstance(payload, dict) or "train_state" not in payload:
        raise CheckpointDamaged(f"{path}: not a train state (no 'train_state' entry)")
    return payload


def write_model_config(folder: Path, model_config: ModelConfig) -> None:
    """Store our ModelConfig as YAML next to the weights."""
    (folder / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(asdict(model_config), sort_keys=False))


def read_model_config(mcore_dir: str | os.PathLike) -> ModelConfig:
    """ModelConfig of a checkpoint: ``model_config.yaml`` written by hf_to_mcore, else the
    ``model`` section of the run config the trainer stores in ``train_state.pt``."""
    path = Path(mcore_dir) / MODEL_CONFIG_FILE
    state = Path(mcore_dir) / STATE_FILE
    if not Path(mcore_dir).is_dir():
        raise FileNotFoundError(f"{mcore_dir}: no such checkpoint folder")
    if path.is_file():
        values, origin = yaml.safe_load(path.read_text()), str(path)
    elif state.is_file():
        values, origin = (read_state_file(str(state)).get("config") or {}).get("model"), str(state)
        if values is None:
            raise ValueError(f"{state}: holds no run config with a 'model' section")
    else:
        raise FileNotFoundError(
            f"{mcore_dir}: no {MODEL_CONFIG_FILE} (hf-to-mcore output) and no "
            f"{STATE_FILE} (trainer checkpoint)"
        )
    cfg = ModelConfig()
    apply_overrides(cfg, values, origin)
    return cfg
