"""load_generator / generator_from_model: a Generator from any checkpoint kind or a live model.

Checkpoint kinds, detected from the folder's files:

* Hugging Face folder (``config.json``): transformers' InternVL layout, the InternVL-chat
  layout or SAIL-VL2's 'sailvl' layout (AIMv2 towers); converted in memory (convert/) and
  sliced to this rank's TP/PP part.
* converted Megatron checkpoint (``metadata.json`` + ``model_config.yaml``, from
  ``tools/convert_checkpoint.py hf-to-mcore``): tokenizer in ``tokenizer/``.
* training checkpoint: a run directory with ``latest`` or one ``iter_N`` directory
  (``train_state.pt``). Tokenizer and processor settings come from ``tokenizer/`` and
  ``processor.json`` inside it; checkpoints written before those existed fall back to the
  ``meta.json`` of the datasets named by the run config the checkpoint stores.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from megatron_sail.checkpoint import dcp, integrity
from megatron_sail.checkpoint.layout import (
    HF_PREPROCESSOR_FILE,
    PROCESSOR_FILE,
    STATE_FILE,
    TOKENIZER_DIR,
    checkpoint_kind,
    pruned_note,
    read_checkpoint,
    read_model_config,
    read_state_file,
    reader_lease,
    resolve_checkpoint,
)
from megatron_sail.config.model import ModelConfig
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.data.tokenizer import Tokenizer, load_tokenizer
from megatron_sail.inference.config import GenerationConfig
from megatron_sail.inference.engine import Generator
from megatron_sail.inference.prompts import ProcessorSettings
from megatron_sail.models.sail_vl import unwrap


@dataclass(frozen=True)
class LoadConfig:
    """How a checkpoint is put on this rank."""

    tp: Optional[int] = None
    """Tensor-parallel size; None: the existing Megatron groups, else 1."""
    pp: Optional[int] = None
    """Pipeline-parallel size; None: the existing Megatron groups, else 1."""
    dtype: Optional[str] = None
    """Parameter dtype (float32, bfloat16, float16); None: float32 on CPU, bfloat16 on GPU."""
    tokenizer: Optional[str] = None
    """Tokenizer path overriding the one the checkpoint names."""


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, resolved."""

    kind: str
    """'hf', 'mcore' (converted) or 'train'."""
    path: Path
    """The folder holding the weights (a training run dir resolves to its latest iter dir)."""
    model_config: ModelConfig
    """Our model config."""
    tokenizer_path: Optional[str]
    """Tokenizer file or folder, None when the checkpoint names none."""
    settings: ProcessorSettings
    """Tiling and template settings."""


# ------------------------------------------------------------------ detection
def inspect_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Resolve a checkpoint path to its kind, model config, tokenizer and processor settings."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(pruned_note(root) or f"--checkpoint {root}: no such file or directory")
    if checkpoint_kind(root) == "hf":
        return _inspect_hf(root)
    if resolve_checkpoint(str(root)) is None:
        raise FileNotFoundError(
            f"--checkpoint {root}: neither a Hugging Face folder (config.json), "
            "a Megatron checkpoint (metadata.json) nor a run directory (latest)"
        )
    return read_checkpoint(str(root), lambda ckpt: _inspect_megatron(Path(ckpt)))


def _inspect_hf(root: Path) -> Checkpoint:
    """HF folder of either layout: model config from its config.json, tokenizer from the folder."""
    from megatron_sail.convert import hf_internvl, hf_io, internvl_chat, sailvl_layout
    from megatron_sail.convert.checkpoint import transformers_config

    raw = hf_io.read_config(root)
    remote = internvl_chat.is_chat_config(raw) or sailvl_layout.is_sailvl_config(raw)
    if not remote and raw.get("model_type") != "internvl":
        raise ValueError(
            f"{root}/config.json: model_type {raw.get('model_type')!r} is not a vision-language "
            "layout generation reads: transformers' InternVL ('internvl'), InternVL-chat "
            f"('{internvl_chat.CHAT_MODEL_TYPE}') or SAIL-VL2's '{sailvl_layout.SAILVL_MODEL_TYPE}' "
            "(AIMv2 towers); tools/convert_checkpoint.py mcore-to-hf writes them (--layout hf for "
            "InternViT models, --layout chat for the hub layouts)"
        )
    tid = (
        internvl_chat.resolve_image_token_id(raw, lambda t: hf_io.find_added_token_id(root, t))
        if remote
        else None
    )
    if sailvl_layout.is_sailvl_config(raw):  # SAIL-VL2: AIMv2 tower, no transformers container
        model_config = sailvl_layout.model_config(raw, tid)
    else:
        hf_config = internvl_chat.chat_config_to_hf(raw, tid) if remote else raw
        model_config = hf_internvl.from_hf_config(transformers_config(hf_config))
    settings = _hf_settings(root, raw, model_config)
    return Checkpoint("hf", root, model_config, str(root), settings)


def _hf_settings(root: Path, raw: dict, model_config: ModelConfig) -> ProcessorSettings:
    """Tiling settings of an HF folder: processor.json (ours), the chat config's dynamic-patch
    fields, or transformers' preprocessor_config.json; the model's tile size otherwise."""
    if (root / PROCESSOR_FILE).is_file():
        return _read_settings(root / PROCESSOR_FILE)
    s = _default_settings(model_config)
    if "max_dynamic_patch" in raw:
        s.max_tiles = int(raw.get("max_dynamic_patch", s.max_tiles))
        s.min_tiles = int(raw.get("min_dynamic_patch", s.min_tiles))
        s.use_thumbnail = bool(raw.get("use_thumbnail", s.use_thumbnail))
    pre = root / HF_PREPROCESSOR_FILE
    if pre.is_file():
        values = json.loads(pre.read_text())
        s.max_tiles = int(values.get("max_patches", s.max_tiles))
        s.min_tiles = int(values.get("min_patches", s.min_tiles))
    return s


def _default_settings(model_config: ModelConfig) -> ProcessorSettings:
    """SAIL-VL defaults at the model's own tile size."""
    return ProcessorSettings(
        tile_size=model_config.vision.image_size, tokens_per_tile=model_config.tokens_per_tile()
    )


def _read_settings(path: Path) -> ProcessorSettings:
    """processor.json, with errors naming the file."""
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return ProcessorSettings.from_dict(values, str(path))


def _inspect_megatron(ckpt: Path) -> Checkpoint:
    """Converted or training checkpoint: model config, tokenizer/ and processor.json inside it,
    else the dataset meta.json named by the stored run config."""
    integrity.check_listing(str(ckpt))  # unlisted files: refused before the first read
    model_config = read_model_config(ckpt)
    kind = "train" if (ckpt / STATE_FILE).is_file() else "mcore"
    tok = ckpt / TOKENIZER_DIR
    tok_path = str(tok) if tok.is_dir() and any(tok.iterdir()) else None
    settings = _read_settings(ckpt / PROCESSOR_FILE) if (ckpt / PROCESSOR_FILE).is_file() else None
    if kind == "train" and (tok_path is None or settings is None):
        meta = _dataset_meta(ckpt)
        if meta is not None:
            tok_path = tok_path or (meta.get("tokenizer") or {}).get("path")
            settings = settings or _meta_settings(meta)
    return Checkpoint(kind, ckpt, model_config, tok_path, settings or _default_settings(model_config))


def _dataset_meta(ckpt: Path) -> Optional[dict]:
    """meta.json of the first training dataset the checkpoint's stored run config names."""
    from megatron_sail.data.indexed import load_meta

    payload = read_state_file(str(ckpt / STATE_FILE))  # weights_only, allow-listed
    data = (payload.get("config") or {}).get("data") or {}
    for entry in data.get("data_path") or []:
        try:
            float(entry)
            continue  # a blend weight, not a prefix
        except (TypeError, ValueError):
            pass
        meta = load_meta(str(entry))
        if meta is not None:
            return meta
    return None


def _meta_settings(meta: dict) -> ProcessorSettings:
    """Processor settings from a dataset's meta.json (the preprocessing that made the data)."""
    t = meta.get("tiling") or {}
    return ProcessorSettings(
        tile_size=int(t.get("tile_size", 448)),
        max_tiles=int(t.get("max_tiles", 12)),
        min_tiles=int(t.get("min_tiles", 1)),
        use_thumbnail=bool(t.get("thumbnail", True)),
        tokens_per_tile=int(t.get("tokens_per_tile", 256)),
        template=dict(meta.get("template") or {}),
    )


# ------------------------------------------------------------------ building
def _dtype(name: Optional[str]) -> torch.dtype:
    """Parameter dtype from its name (None: float32 on CPU, bfloat16 with CUDA)."""
    from megatron_sail.platform.distributed import has_cuda

    if name is None:
        return torch.bfloat16 if has_cuda() else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def _platform(load: LoadConfig) -> ParallelConfig:
    """Start torch.distributed + Megatron groups unless they exist; the layout in use.

    Experts are always loaded whole (EP=1): expert-parallel ranks would be data-parallel
    replicas decoding the same prompts, and a dist checkpoint saved at any EP reshards to EP=1.
    Groups that exist with EP > 1 are rebuilt at EP=1 with their TP/PP."""
    from megatron.core import parallel_state

    from megatron_sail.platform import distributed

    ready = parallel_state.model_parallel_is_initialized()
    if ready and load.tp is None and load.pp is None:
        parallel = ParallelConfig(
            tp=parallel_state.get_tensor_model_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_world_size(),
        )
    else:
        parallel = ParallelConfig(tp=load.tp or 1, pp=load.pp or 1)
    if (
        not ready
        or parallel_state.get_tensor_model_parallel_world_size() != parallel.tp
        or parallel_state.get_pipeline_model_parallel_world_size() != parallel.pp
        or parallel_state.get_expert_model_parallel_world_size() != 1
    ):
        distributed.initialize(parallel)
    return parallel


_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "zeros_",
    "ones_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "eye_",
    "dirac_",
    "sparse_",
)


@contextmanager
def _no_random_init():
    """Parameters are allocated but not initialized while building a model whose every weight
    the checkpoint then overwrites (transformers' ``from_pretrained`` does the same): the init
    would cost seconds for a 0.5B model and change nothing. Megatron binds ``torch.nn.init``
    functions when its configs are made, which happens inside the build, so swapping them for
    the duration reaches every init."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    for name in saved:
        setattr(torch.nn.init, name, lambda tensor, *_a, **_k: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _build(model_config: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype) -> list:
    """This rank's model chunk on the model device, local spec (SDPA), eval mode; weights
    uninitialized (the caller loads every one of them)."""
    from megatron_sail.convert.checkpoint import build_model_chunks
    from megatron_sail.platform.distributed import device

    with _no_random_init():
        chunks = build_model_chunks(model_config, parallel, dtype=dtype, use_te=False)
    return [c.to(device()).eval() for c in chunks]


def _load_hf_weights(chunks: list, ckpt: Checkpoint) -> None:
    """Stream the HF folder into the chunk, one tensor at a time: the files are mapped; at TP=1
    a parameter that is a plain copy of a file tensor of its dtype becomes a view of the mapped
    file (read on first use), and fused q/k/v and concatenations are written part by part into
    their parameters; under TP each slice is made when its parameter is filled. The file pages
    a filled parameter came from are released right after, so the load stays near the model's
    own size instead of holding the file and converted copies besides."""
    from megatron.core import parallel_state

    from megatron_sail.convert import hf_internvl
    from megatron_sail.convert.checkpoint import read_hf_checkpoint
    from megatron_sail.convert.mapped_safetensors import MappedCheckpoint

    mapped = MappedCheckpoint(ckpt.path)
    try:
        full = hf_internvl.LazyOurs(read_hf_checkpoint(ckpt.path, raw=mapped.state).state, ckpt.model_config)
        whole = parallel_state.get_tensor_model_parallel_world_size() == 1
        with torch.no_grad():
            for chunk in chunks:
                if whole:  # every tensor is the full one: write it in place, or share the file's
                    for _key, param, gkey in hf_internvl.global_keys(chunk):
                        if not full.fill(gkey, param):
                            mapped.release(full.sources(gkey))
                    continue
                params = chunk.state_dict(keep_vars=True)
                for key, value, gkey in hf_internvl.iter_shards(full, chunk):
                    params[key].copy_(value)
                    del value
                    mapped.release(full.sources(gkey))
    finally:
        mapped.close()


def _tokenizer(ckpt: Checkpoint, override: Optional[str]) -> Tokenizer:
    """The checkpoint's tokenizer, checked against the model's image-context id."""
    path = override or ckpt.tokenizer_path
    if path is None:
        raise FileNotFoundError(
            f"{ckpt.path}: the checkpoint names no tokenizer (no tokenizer/ "
            "folder, no dataset meta.json); pass --tokenizer"
        )
    tok = load_tokenizer(str(path))
    want = ckpt.model_config.img_context_token_id
    if tok.special.img_context != want:
        raise ValueError(
            f"tokenizer {path}: <IMG_CONTEXT> is id {tok.special.img_context} but the "
            f"model {ckpt.path} expects {want}"
        )
    return tok


def load_generator(
    checkpoint: str, cfg: GenerationConfig = GenerationConfig(), load: LoadConfig = LoadConfig()
) -> Generator:
    """A Generator for a training checkpoint, a converted Megatron checkpoint or an HF folder.

    Collective: every rank calls it. Starts torch.distributed and the Megatron groups (TP/PP
    from ``load``, default 1, or the ones already set up) when needed. Mixture-of-experts
    models are built at EP=1 whatever EP the checkpoint was trained at (see ``_platform``).
    """
    ckpt = inspect_checkpoint(checkpoint)
    # Leased from here to the end of the load: a run saving beside it with --keep-last does not
    # prune it while the model is built (checkpoint/lease.py).
    with nullcontext() if ckpt.kind == "hf" else reader_lease(ckpt.path):
        parallel = _platform(load)
        chunks = _build(ckpt.model_config, parallel, _dtype(load.dtype))
        if ckpt.kind == "hf":
            _load_hf_weights(chunks, ckpt)
            tok = _tokenizer(ckpt, load.tokenizer)
        else:  # a run still saving may prune it meanwhile: then the new latest is read
            ckpt, tok = read_checkpoint(checkpoint, partial(_load_megatron, chunks, ckpt, load.tokenizer))
    return Generator(chunks, ckpt.model_config, tok, ckpt.settings, cfg)


def _load_megatron(
    chunks: list, first: Checkpoint, tokenizer: Optional[str], path: str
) -> tuple[Checkpoint, Tokenizer]:
    """Weights and tokenizer of checkpoint folder ``path`` into chunks built for ``first`` (the
    folder inspected before building; another one when that was pruned meanwhile)."""
    found = first if Path(path) == first.path else _inspect_megatron(Path(path))
    if found.model_config != first.model_config:
        raise ValueError(
            f"{path}: holds another model than {first.path}, which was deleted while being read; run again"
        )
    dcp.load_model(chunks, found.path, map_file=True)
    return found, _tokenizer(found, tokenizer)


def generator_from_model(
    chunks,
    model_config: ModelConfig,
    tokenizer: Tokenizer,
    images_cfg,
    cfg: GenerationConfig = GenerationConfig(),
) -> Generator:
    """Wrap a training run's live chunks (any layout, DDP-wrapped allowed) without reloading.

    ``images_cfg`` gives the tiling the data was made with: a ProcessorSettings, a
    TilingConfig, or a dict of processor.json fields. ``generate`` leaves every chunk in the
    train/eval mode it found it in.
    """
    if isinstance(images_cfg, ProcessorSettings):
        settings = images_cfg
    elif isinstance(images_cfg, dict):
        settings = ProcessorSettings.from_dict(images_cfg, "images_cfg")
    elif images_cfg is None:
        settings = _default_settings(model_config)
    else:  # a TilingConfig / ImageConfig-like object: read the fields it has
        d = _default_settings(model_config)
        settings = ProcessorSettings(
            tile_size=getattr(images_cfg, "tile_size", d.tile_size),
            max_tiles=getattr(images_cfg, "max_tiles", d.max_tiles),
            min_tiles=getattr(images_cfg, "min_tiles", d.min_tiles),
            use_thumbnail=getattr(
                images_cfg, "thumbnail", getattr(images_cfg, "use_thumbnail", d.use_thumbnail)
            ),
            tokens_per_tile=getattr(images_cfg, "tokens_per_tile", d.tokens_per_tile),
        )
    unwrap(chunks[0])  # fail early on a non-module
    return Generator(list(chunks), model_config, tokenizer, settings, cfg)
