"""Reading and writing Hugging Face checkpoint folders (config.json + safetensors + tokenizer).

Checkpoints on the hub come as one ``model.safetensors`` or as shards listed in
``model.safetensors.index.json``; both read the same way here. Writing goes to a temporary
folder next to the destination that is renamed only when every file is complete, so an
interrupted conversion never leaves something that looks like a checkpoint.

transformers (5.x) keeps InternVL's weights under ``model.*`` in memory but saves them in the
older on-disk names (``vision_tower.*``, ``language_model.model.*``, ...); ``to_module_keys`` and
``to_disk_keys`` translate between the two so the rest of the code sees one naming.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_sail.checkpoint.layout import HF_CONFIG, HF_GENERATION_FILE

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
    HF_GENERATION_FILE,
)
"""Side files copied verbatim between checkpoint folders (tokenizer and generation defaults)."""

# (on-disk prefix, in-memory prefix) pairs of transformers' InternVL; order matters (longest first).
_DISK_TO_MODULE = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


@dataclass(frozen=True)
class HFWriteConfig:
    """How a transformers checkpoint folder is written."""

    max_shard_bytes: int = 5 * 1024**3
    """Largest safetensors file; bigger state dicts are split into shards with an index file."""
    overwrite: bool = False
    """Replace an existing non-empty destination instead of refusing."""


def read_config(hf_dir: str | os.PathLike) -> dict:
    """Load ``config.json`` of a checkpoint folder, with an error that names the folder."""
    path = Path(hf_dir) / HF_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint folder)")
    return _read_json(path)


def safetensors_files(hf_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Map each safetensors file of the folder to the tensor names it must hold.

    With an index, the index is the truth (a shard missing a listed tensor is an error later);
    without one, the single file holds whatever it holds (empty list = take all).
    """
    root = Path(hf_dir)
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(shard, []).append(name)
        return files
    if (root / SAFETENSORS_FILE).is_file():
        return {SAFETENSORS_FILE: []}
    found = sorted(p.name for p in root.glob("*.bin"))
    hint = f" (found {found}; convert .bin to safetensors first)" if found else ""
    raise FileNotFoundError(f"{hf_dir}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}{hint}")


def read_state_dict(hf_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint folder (sharded or not) into CPU memory, keys as stored."""
    root = Path(hf_dir)
    state: dict[str, torch.Tensor] = {}
    for shard, expected in safetensors_files(root).items():
        path = root / shard
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard listed in {SAFETENSORS_INDEX} is missing")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = list(f.keys())
                missing = sorted(set(expected) - set(names))
                if missing:
                    raise ValueError(f"{path}: tensors listed in the index are missing: {missing[:5]}")
                for name in names:
                    if name in state:
                        raise ValueError(f"{path}: tensor {name!r} appears in more than one shard")
                    state[name] = f.get_tensor(name)
        except (OSError, RuntimeError, SafetensorError) as e:  # truncated or corrupt file
            raise ValueError(f"{path}: cannot read safetensors file ({e})") from e
    return state


def _swap_prefixes(state: dict[str, torch.Tensor], pairs) -> dict[str, torch.Tensor]:
    """Rename each key by the first (old, new) prefix pair it starts with; others pass through."""
    out = {}
    for key, value in state.items():
        for old, new in pairs:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def to_module_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers InternVL on-disk keys to InternVLForConditionalGeneration's own keys.

    Keys already in module form pass through, so both spellings of a checkpoint are accepted.
    """
    return _swap_prefixes(state, _DISK_TO_MODULE)


def to_disk_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename module keys to the names transformers' ``save_pretrained`` writes for InternVL."""
    return _swap_prefixes(state, [(module, disk) for disk, module in _DISK_TO_MODULE])


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer/generation side files that exist in ``src``; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        path = Path(src) / name
        if path.is_file():
            shutil.copy2(path, Path(dst) / name)
            copied.append(name)
    return copied


def apply_umask(folder: Path) -> None:
    """Give a finished folder the modes the user's umask asks for: some writers (safetensors)
    create files 0600, which left an export unreadable by the rest of a team."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes ``dest`` only if the block succeeds.

    The temporary folder sits next to ``dest`` (same filesystem, so the rename is atomic) and is
    removed on failure. An existing non-empty ``dest`` is refused unless ``overwrite``.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"{dest}: destination exists and is not empty")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        apply_umask(tmp)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Group tensor names, in key order, into shards of at most ``max_bytes`` (one tensor may exceed)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(folder: Path, state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """Write ``state`` as one file or as shards plus an index; return the file names written.

    Tensors that share storage (tied weights) are cloned: safetensors refuses shared storage.
    """
    seen: set[int] = set()
    tensors = {}
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(folder / SAFETENSORS_FILE), metadata={"format": "pt"})
        return [SAFETENSORS_FILE]
    names, weight_map = [], {}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
        names.append(fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + [SAFETENSORS_INDEX]


def write_checkpoint(
    dest: str | os.PathLike,
    config: dict,
    state: dict[str, torch.Tensor],
    tokenizer_from: str | os.PathLike | None = None,
    cfg: HFWriteConfig = HFWriteConfig(),
) -> Path:
    """Write config.json, safetensors and (optionally) tokenizer files to ``dest`` atomically."""
    with atomic_dir(dest, overwrite=cfg.overwrite) as tmp:
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_safetensors(tmp, state, cfg.max_shard_bytes)
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
    return Path(dest)


def _read_json(path: Path) -> dict:
    """Parse a JSON side file; a broken one is an error that names it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def find_added_token_id(hf_dir: str | os.PathLike, token: str) -> int | None:
    """Look ``token`` up in the tokenizer files of a folder without loading a tokenizer.

    Used for the image-context token id of InternVL-chat checkpoints, whose config does not
    store it. Returns None when no tokenizer file names the token.
    """
    root = Path(hf_dir)
    tok = root / "tokenizer.json"
    if tok.is_file():
        data = _read_json(tok)
        for entry in data.get("added_tokens", []):
            if entry.get("content") == token:
                return int(entry["id"])
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    added = root / "added_tokens.json"
    if added.is_file():
        ids = _read_json(added)
        if token in ids:
            return int(ids[token])
    tcfg = root / "tokenizer_config.json"
    if tcfg.is_file():
        for tid, entry in (_read_json(tcfg).get("added_tokens_decoder") or {}).items():
            if entry.get("content") == token:
                return int(tid)
    return None
