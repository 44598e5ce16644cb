"""Drivers: Hugging Face checkpoint folder <-> Megatron-Core distributed checkpoint.

hf -> mcore: read either HF layout (transformers "internvl" or InternVL-chat "internvl_chat"),
bring it to transformers' module keys, map to our parameter names (hf_internvl), load the
tensors into a SailVLModel built at TP=1/PP=1 and save it with checkpoint/dcp.py. Megatron's sharded
state dict stores every tensor under a global key with its full shape, so the result loads at
any TP/PP. Next to it go ``model_config.yaml`` (our ModelConfig), ``hf_config.json`` (the
transformers config, so the way back restores fields our config does not model) and the
tokenizer files under ``tokenizer/``, the processor settings (``processor.json``) and, for
InternVL-chat sources, the remote code and config under ``source_files/``. ViT layers after
``select_layer`` have no parameter in our model; their HF tensors go to
``unused_hf_tensors.safetensors`` and come back on export.

mcore -> hf: build the model at TP=1/PP=1, load the dist checkpoint, map back and write
transformers' layout, or with ``layout="chat"`` the InternVL-chat layout with the remote code
that came in (atomic). Each tensor gets back its source dtype, so a round trip is bit-exact
(fp32 holds every bf16/fp16 value exactly). Tokenizer, chat template, processor and generation
configs are always written (hf_assets), so the folder is usable as is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from megatron_sail.checkpoint import dcp, integrity
from megatron_sail.checkpoint.layout import (
    CONVERSION_FILE,
    HF_CONFIG,
    HF_CONFIG_FILE,
    HF_GENERATION_FILE,
    PROCESSOR_FILE,
    SOURCE_DIR,
    TOKENIZER_DIR,
    UNUSED_FILE,
    read_checkpoint,
    read_model_config,
    write_model_config,
)
from megatron_sail.checkpoint.processor import ProcessorSettings
from megatron_sail.checkpoint.tokenizer import save_tokenizer
from megatron_sail.config.model import ModelConfig
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.convert import hf_assets, hf_internvl, hf_io, internvl_chat, sailvl_layout
from megatron_sail.models.families import vision_family

LAYOUTS = ("hf", "chat")


@dataclass(frozen=True)
class ConvertConfig:
    """Options of both conversion directions."""

    overwrite: bool = False
    """Replace a non-empty output folder instead of refusing."""
    max_shard_bytes: int = 5 * 1024**3
    """Largest safetensors file written by mcore -> hf."""
    layout: str = "hf"
    """mcore -> hf output: 'hf' (transformers InternVL, AutoProcessor-ready; InternViT models
    only) or 'chat' (the hub's remote-code layout with the remote code the checkpoint carries,
    for trust_remote_code loaders: InternVL-chat for InternViT, SAIL-VL2's 'sailvl' for AIMv2)."""
    tokenizer: Optional[str] = None
    """mcore -> hf: tokenizer to write instead of the checkpoint's tokenizer/ (needed when it
    records none): tokenizer.json or a tokenizer folder, checked against the model's ids."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"ConvertConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")


log = logging.getLogger(__name__)


@dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint brought to transformers' InternVL form, whatever its layout."""

    config: dict
    """transformers InternVLConfig as a dict."""
    state: dict
    """Tensors under InternVLForConditionalGeneration's module keys (model.*, lm_head.*)."""
    layout: str
    """'hf', 'chat' (InternVL-chat) or 'sailvl' (SAIL-VL2): the layout it was read from."""
    path: Path
    """Folder it was read from (tokenizer files are copied from here)."""
    model_config: Optional[ModelConfig] = None
    """Our ModelConfig, for layouts whose vision tower transformers' InternVL cannot describe
    (sailvl: AIMv2); then ``config`` is the source config.json. None: from ``config``."""


def read_hf_checkpoint(hf_dir: str | os.PathLike, raw: Optional[dict] = None) -> HFCheckpoint:
    """Read config + all safetensors of either layout into transformers' form (``raw``: the
    folder's tensors already read, e.g. mapped ones, keys as stored)."""
    hf_dir = Path(hf_dir)
    config = hf_io.read_config(hf_dir)
    raw = hf_io.read_state_dict(hf_dir) if raw is None else raw
    if internvl_chat.is_chat_config(config) or sailvl_layout.is_sailvl_config(config):
        tid = internvl_chat.resolve_image_token_id(config, lambda tok: hf_io.find_added_token_id(hf_dir, tok))
        if sailvl_layout.is_sailvl_config(config):
            return HFCheckpoint(
                config,
                sailvl_layout.to_hf_state_dict(raw),
                "sailvl",
                hf_dir,
                sailvl_layout.model_config(config, tid),
            )
        return HFCheckpoint(
            internvl_chat.chat_config_to_hf(config, tid),
            internvl_chat.chat_to_hf_state_dict(raw),
            "chat",
            hf_dir,
        )
    if config.get("model_type") != "internvl":
        raise ValueError(
            f"{hf_dir}/config.json: model_type {config.get('model_type')!r} is neither "
            f"'internvl' (transformers), '{internvl_chat.CHAT_MODEL_TYPE}' (InternVL-chat) "
            f"nor '{sailvl_layout.SAILVL_MODEL_TYPE}' (SAIL-VL2)"
        )
    return HFCheckpoint(config, hf_io.to_module_keys(raw), "hf", hf_dir)


def checkpoint_model_config(hf: HFCheckpoint) -> ModelConfig:
    """Our ModelConfig of a read checkpoint, whatever its layout."""
    return hf.model_config or hf_internvl.from_hf_config(transformers_config(hf.config))


def transformers_config(config: dict):
    """transformers InternVLConfig object from its dict form."""
    from transformers import InternVLConfig

    return InternVLConfig(**{k: v for k, v in config.items() if k not in ("architectures",)})


# ------------------------------------------------------------------ our side of the mapping
def build_model_chunks(
    model_config: ModelConfig,
    parallel: ParallelConfig,
    dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
) -> list[torch.nn.Module]:
    """This rank's SailVLModel stage (one chunk; no virtual pipeline) for the current groups.

    Conversion builds with the local spec (``use_te=False``): its parameter names are the ones
    hf_internvl maps, and the sharded keys it saves are the same for the TE spec.
    """
    from megatron.core import parallel_state

    from megatron_sail.models.sail_vl import SailVLModel

    return [
        SailVLModel(
            model_config,
            parallel,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
            dtype=dtype,
            use_te=use_te,
        )
    ]


# ------------------------------------------------------------------ drivers
def _single_rank() -> None:
    """Start torch.distributed and Megatron groups at TP=PP=1 (conversion runs in one process)."""
    import torch.distributed as dist

    from megatron_sail.platform import distributed

    if dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError("checkpoint conversion runs in a single process (no torchrun)")
    distributed.initialize(ParallelConfig())


def _gib(state: dict) -> float:
    """Bytes of a state dict in GiB."""
    return sum(t.numel() * t.element_size() for t in state.values()) / 2**30


def _phase(what: str, start: float) -> None:
    """One progress line per conversion phase (minutes each on a large model)."""
    log.info(f"convert: {what} [{time.perf_counter() - start:.1f}s]")


def hf_to_mcore(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: ConvertConfig = ConvertConfig()
) -> Path:
    """Convert an HF checkpoint folder (either layout) into a Megatron dist checkpoint folder."""
    _check_not_source(hf_dir, out_dir, "--hf-dir")
    _check_empty(out_dir, cfg.overwrite)
    start = time.perf_counter()
    hf = read_hf_checkpoint(hf_dir)
    _phase(f"read {hf_dir}: {len(hf.state)} tensors, {_gib(hf.state):.2f} GiB ({hf.layout} layout)", start)
    model_config = checkpoint_model_config(hf)
    ours = hf_internvl.hf_to_ours(hf.state, model_config)
    unused = hf_internvl.unused_hf_tensors(hf.state, model_config)
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in hf.state.items()}
    del hf.state
    _single_rank()
    [model] = build_model_chunks(model_config, ParallelConfig(), use_te=False)
    _load_full_state(model, ours)
    _phase("built the Megatron model and loaded the weights", start)
    with hf_io.atomic_dir(out_dir, overwrite=cfg.overwrite) as tmp:
        dcp.save_sharded(dcp.model_sharded_state_dict([model]), tmp)
        _phase(f"wrote the distributed checkpoint into {out_dir}", start)
        if unused:
            save_file({k: v.contiguous() for k, v in unused.items()}, str(tmp / UNUSED_FILE))
        write_model_config(tmp, model_config)
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf.config, indent=2, sort_keys=True) + "\n")
        (tmp / CONVERSION_FILE).write_text(
            json.dumps({"source": str(hf.path), "source_layout": hf.layout, "hf_dtypes": dtypes}, indent=2)
            + "\n"
        )
        tok = tmp / TOKENIZER_DIR
        tok.mkdir()
        if not hf_io.copy_tokenizer_files(hf.path, tok):
            tok.rmdir()
        _record_source(hf, model_config, tmp)
        integrity.write_manifest(str(tmp))  # last: sizes + SHA-256 of every file above
    return Path(out_dir)


def _check_not_source(src: str | os.PathLike, out_dir: str | os.PathLike, flag: str) -> None:
    """Refuse an --out that is the source folder or contains it: replacing it (--overwrite)
    would delete the checkpoint being converted."""
    s, o = Path(src).resolve(), Path(out_dir).resolve()
    if o == s or o in s.parents:
        raise ValueError(
            f"--out {out_dir} is {'the same folder as' if o == s else 'a parent of'} "
            f"{flag} {src}: writing there would replace the source checkpoint; "
            "choose another --out"
        )


def _record_source(hf: HFCheckpoint, model_config: ModelConfig, tmp: Path) -> None:
    """processor.json from the source's processor/chat config, and (chat layout) every
    non-weight, non-tokenizer source file - remote code and config - for the way back."""
    raw = hf_io.read_config(hf.path)
    tile = model_config.vision.image_size
    hf_assets.settings_from_hf(hf.path, raw, model_config.tokens_per_tile(tile), tile).write(tmp)
    if hf.layout in ("chat", "sailvl"):
        hf_assets.copy_source_files(hf.path, tmp / SOURCE_DIR, skip=hf_io.TOKENIZER_FILES + (PROCESSOR_FILE,))


def _check_empty(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a non-empty output before any work (the final rename checks again)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: output exists and is not empty (use --overwrite)")


def _load_full_state(model: torch.nn.Module, ours: dict[str, torch.Tensor]) -> None:
    """Copy an unsharded state dict into a TP=1/PP=1 model, refusing missing or extra tensors."""
    expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    missing, extra = sorted(expected - set(ours)), sorted(set(ours) - expected)
    if missing or extra:
        raise ValueError(
            f"converted state dict does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    with torch.no_grad():
        params = dict(model.state_dict(keep_vars=True))
        for key, value in ours.items():
            target = params[key]
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(
                    f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(target.shape)}"
                )
            target.copy_(value)


def mcore_to_hf(
    mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: ConvertConfig = ConvertConfig()
) -> Path:
    """Convert a Megatron dist checkpoint (ours: one checkpoint folder, or a --save root whose
    `latest` is read) into transformers' InternVL folder. A run that prunes the checkpoint
    while it is read (--keep-last) makes this convert the new latest, or say it was deleted."""
    _check_not_source(mcore_dir, out_dir, "--mcore-dir")
    _check_empty(out_dir, cfg.overwrite)
    return read_checkpoint(str(mcore_dir), lambda ckpt: _mcore_to_hf(Path(ckpt), out_dir, cfg))


def _mcore_to_hf(mcore_dir: Path, out_dir: str | os.PathLike, cfg: ConvertConfig) -> Path:
    """mcore_to_hf of one checkpoint folder."""
    integrity.check_listing(str(mcore_dir))  # unlisted files: refused before the first read
    model_config = read_model_config(mcore_dir)
    if not vision_family(model_config.vision.family).vlm_export:
        raise ValueError(
            f"{mcore_dir}: no HF VLM layout (--layout hf or chat) holds a "
            f"{model_config.vision.family!r} vision tower beside the projector; export is "
            "refused rather than written in a layout whose code would run it differently"
        )
    if not vision_family(model_config.vision.family).in_internvl_container and cfg.layout != "chat":
        raise ValueError(
            f"{mcore_dir}: transformers' InternVL layout (--layout hf) cannot hold a "
            f"{model_config.vision.family!r} vision tower (it has no class token and InternVL's "
            "vision config cannot describe it); use --layout chat, which writes SAIL-VL2's "
            "'sailvl' remote-code layout (docs/conversion.md)"
        )
    source = mcore_dir / SOURCE_DIR
    if cfg.layout == "chat" and not (source / HF_CONFIG).is_file():
        raise ValueError(_no_remote_code_message(mcore_dir, model_config))
    tokenizer = _tokenizer_source(mcore_dir, cfg)
    settings = _processor_settings(mcore_dir, model_config)
    _refuse_padded_grid(mcore_dir, model_config, settings.tile_size)
    _single_rank()
    start = time.perf_counter()
    [model] = build_model_chunks(model_config, ParallelConfig(), use_te=False)
    dcp.load_model([model], mcore_dir)
    _phase(f"loaded {mcore_dir}", start)
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if not vision_family(model_config.vision.family).in_internvl_container:
        return _write_sailvl(mcore_dir, out_dir, cfg, model_config, ours, tokenizer, settings, source)
    hf_config = _hf_config_for(mcore_dir, model_config)
    state = hf_internvl.ours_to_hf(ours, model_config)
    if model_config.language.tie_embeddings:
        state.pop("lm_head.weight", None)  # transformers stores tied weights once, as it saves them
    dtypes = _source_dtypes(mcore_dir)
    state = {
        k: v.to(getattr(torch, dtypes.get(k, str(v.dtype).removeprefix("torch.")))) for k, v in state.items()
    }
    state.update(_unused_tensors(mcore_dir, hf_config))
    hf_config["image_seq_length"] = settings.tokens_per_tile
    if cfg.layout == "chat":
        config, disk = _chat_config(source, hf_config, settings), internvl_chat.hf_to_chat_state_dict(state)
    else:
        config, disk = hf_config, hf_io.to_disk_keys(state)
    with hf_io.atomic_dir(out_dir, overwrite=cfg.overwrite) as tmp:
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        hf_io.write_safetensors(tmp, disk, cfg.max_shard_bytes)
        _phase(f"wrote {len(disk)} tensors, {_gib(disk):.2f} GiB of safetensors", start)
        _write_side_files(tmp, tokenizer, settings, hf_config["image_token_id"], cfg.layout, source)
    return Path(out_dir)


def _no_remote_code_message(mcore_dir: Path, model_config: ModelConfig) -> str:
    """Why --layout chat cannot be written (no source_files/: a model trained from scratch or
    from a transformers-layout start) and what works instead, in one line."""
    why = (
        f"{mcore_dir}: --layout chat writes the hub's remote-code layout and needs that remote "
        f"code in {SOURCE_DIR}/, which only a checkpoint converted from an InternVL-chat or "
        "sailvl hub folder (or trained with --init-from one) carries; this one has none"
    )
    if vision_family(model_config.vision.family).in_internvl_container:
        return (
            why + "; export with --layout hf (the default) instead: transformers loads it, "
            "and VLMEvalKit evaluates it served by vLLM (docs/evaluation.md)"
        )
    return (
        why + f", and a {model_config.vision.family!r} vision tower has no transformers "
        "layout either: evaluate the checkpoint itself with tools/evaluate.py"
    )


def _write_sailvl(
    mcore_dir: Path,
    out_dir,
    cfg: ConvertConfig,
    model_config: ModelConfig,
    ours: dict,
    tokenizer: Path,
    settings: ProcessorSettings,
    source: Path,
) -> Path:
    """mcore -> SAIL-VL2's 'sailvl' layout (AIMv2 towers): tensors in the hub's names and source
    dtypes, the tied LM head written too (as the hub file stores it), the source config.json
    (rebuilt around the new shapes when the architecture changed), remote code and side files."""
    stored = json.loads((source / HF_CONFIG).read_text())
    if not sailvl_layout.is_sailvl_config(stored):
        raise ValueError(
            f"{source}/config.json: model_type {stored.get('model_type')!r}; an "
            f"{model_config.vision.family!r} model exports to the "
            f"'{sailvl_layout.SAILVL_MODEL_TYPE}' layout, whose remote code it needs"
        )
    tid = model_config.img_context_token_id
    state = hf_internvl.ours_to_hf(ours, model_config)
    dtypes = _source_dtypes(mcore_dir)
    state = {
        k: v.to(getattr(torch, dtypes.get(k, str(v.dtype).removeprefix("torch.")))).clone()
        for k, v in state.items()
    }
    state.update(_unused_sailvl_tensors(mcore_dir))
    same = _comparable(sailvl_layout.model_config(stored, tid)) == _comparable(model_config)
    config = stored if same else sailvl_layout.config_for(model_config, stored)
    with hf_io.atomic_dir(out_dir, overwrite=cfg.overwrite) as tmp:
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        hf_io.write_safetensors(tmp, sailvl_layout.from_hf_state_dict(state), cfg.max_shard_bytes)
        _write_side_files(tmp, tokenizer, settings, tid, "chat", source)
    return Path(out_dir)


def _comparable(model_config: ModelConfig) -> ModelConfig:
    """A ModelConfig without the fields a config.json does not record (drop path)."""
    import dataclasses

    return dataclasses.replace(
        model_config, vision=dataclasses.replace(model_config.vision, drop_path_rate=0.0)
    )


def _unused_sailvl_tensors(mcore_dir: Path) -> dict[str, torch.Tensor]:
    """Stored AIMv2 layers beyond ``select_layer`` (and the final norm they feed), source dtype
    (the encoder's depth is part of the architecture, so they always still fit)."""
    from safetensors.torch import load_file

    path = mcore_dir / UNUSED_FILE
    return dict(load_file(str(path))) if path.is_file() else {}


def _tokenizer_source(mcore_dir: Path, cfg: ConvertConfig) -> Path:
    """The tokenizer to export: --tokenizer when given (its ids are checked against the model
    later), else the checkpoint's tokenizer/; refusing here, before any work, beats an export on
    which AutoTokenizer silently builds an empty tokenizer."""
    if cfg.tokenizer:
        if not Path(cfg.tokenizer).exists():
            raise FileNotFoundError(f"--tokenizer {cfg.tokenizer}: not found")
        return Path(cfg.tokenizer)
    own = mcore_dir / TOKENIZER_DIR
    if own.is_dir() and any(own.iterdir()):
        return own
    raise FileNotFoundError(
        f"{mcore_dir}: records no tokenizer ({TOKENIZER_DIR}/ is missing); pass --tokenizer with "
        "the tokenizer the training data was made with (the 'tokenizer.path' of its meta.json)"
    )


def _refuse_padded_grid(mcore_dir: Path, model_config: ModelConfig, tile: int) -> None:
    """Refuse a model whose pixel shuffle zero-pads an odd patch grid (odd_grid='pad'): the HF
    layouts' pixel shuffles (transformers' InternVL, the chat remote code) have no padding, so
    they would fail or merge the wrong patches."""
    g = model_config.geometry(tile)
    if g.padded:
        raise ValueError(
            f"{mcore_dir}: the model zero-pads its {g.grid}x{g.grid} patch grid to a multiple of "
            f"{g.merge} before the pixel shuffle (projector.odd_grid='pad'); the HF layouts' "
            "pixel shuffles cannot express that padding, so export is refused"
        )


def _processor_settings(mcore_dir: Path, model_config: ModelConfig) -> ProcessorSettings:
    """processor.json of the checkpoint; for older checkpoints without one, the model's own
    tile geometry with SAIL-VL's tiling defaults (and a note saying so)."""
    path = mcore_dir / PROCESSOR_FILE
    if path.is_file():
        settings = ProcessorSettings.read(path)
    else:
        tile = model_config.vision.image_size
        settings = ProcessorSettings(tile_size=tile, tokens_per_tile=model_config.tokens_per_tile(tile))
        print(
            f"note: {mcore_dir} has no {PROCESSOR_FILE}; using tile {tile}, "
            f"{settings.min_tiles}-{settings.max_tiles} tiles, thumbnail on"
        )
    want = model_config.tokens_per_tile(settings.tile_size)
    if settings.tokens_per_tile != want:
        raise ValueError(
            f"{path}: tokens_per_tile {settings.tokens_per_tile} but the model makes "
            f"{want} per {settings.tile_size}px tile"
        )
    return settings


def _chat_config(source: Path, hf_config: dict, settings: ProcessorSettings) -> dict:
    """InternVL-chat config.json: the source's own (auto_map, template, extra fields kept)
    unless the architecture changed since, then rebuilt with the source's remote-code fields."""
    stored = json.loads((source / HF_CONFIG).read_text())
    tid = hf_config["image_token_id"]
    before = internvl_chat.chat_config_to_hf(stored, tid)
    if _arch(before) == _arch(hf_config):
        return stored
    fresh = internvl_chat.hf_config_to_chat(
        hf_config, stored.get("template", "sailvl-chat"), settings.max_tiles
    )
    for key in ("auto_map", "architectures", "template", "dynamic_image_size"):
        if key in stored:
            fresh[key] = stored[key]
    return fresh


def _arch(hf_config: dict) -> dict:
    """The parts of a transformers InternVL config that our model config captures."""
    return hf_internvl.to_hf_config(hf_internvl.from_hf_config(transformers_config(hf_config))).to_dict()


def _write_side_files(
    tmp: Path, tokenizer: Path, settings: ProcessorSettings, image_token_id: int, layout: str, source: Path
) -> None:
    """Tokenizer (+ chat template), generation config, processor configs, remote code; then
    load the tokenizer back as users will and refuse an unusable one."""
    ids = save_tokenizer(tokenizer, tmp, {internvl_chat.IMG_CONTEXT: image_token_id}, settings.template)
    if not (tmp / HF_GENERATION_FILE).is_file():
        hf_assets.write_generation_config(tmp, ids)
    if layout == "chat":
        settings.write(tmp)
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name != HF_CONFIG and not (tmp / path.name).exists():
                shutil.copy2(path, tmp / path.name)
    else:
        hf_assets.write_processor_files(tmp, settings)
        if not settings.use_thumbnail:
            print(
                "warning: the model was trained without thumbnail tiles; transformers' "
                "InternVL image processor always adds one to multi-tile images"
            )
    hf_assets.check_tokenizer(tmp, image_token_id)


def _hf_config_for(mcore_dir: Path, model_config: ModelConfig) -> dict:
    """The transformers config to write: the stored source config when present (it keeps fields
    we do not model, e.g. token ids of the tokenizer), unless the architecture has changed."""
    fresh = hf_internvl.to_hf_config(model_config).to_dict()
    fresh["architectures"] = ["InternVLForConditionalGeneration"]
    path = mcore_dir / HF_CONFIG_FILE
    if not path.is_file():
        return fresh
    stored = json.loads(path.read_text())
    same = hf_internvl.to_hf_config(hf_internvl.from_hf_config(transformers_config(stored))).to_dict()
    if same != hf_internvl.to_hf_config(model_config).to_dict():
        return fresh  # e.g. vocabulary resized after conversion: trust the checkpoint's own config
    stored.setdefault("architectures", ["InternVLForConditionalGeneration"])
    return stored


def _unused_tensors(mcore_dir: Path, hf_config: dict) -> dict[str, torch.Tensor]:
    """Stored ViT layers beyond ``select_layer`` (source dtype), when the config still has them."""
    from safetensors.torch import load_file

    path = mcore_dir / UNUSED_FILE
    if not path.is_file():
        return {}
    layers = hf_config["vision_config"]["num_hidden_layers"]
    return {
        k: v
        for k, v in load_file(str(path)).items()
        if int(k.split("encoder.layer.")[1].split(".")[0]) < layers
    }


def _source_dtypes(mcore_dir: Path) -> dict[str, str]:
    """Per-tensor dtypes of the HF checkpoint this one came from (empty if unknown)."""
    path = mcore_dir / CONVERSION_FILE
    return json.loads(path.read_text()).get("hf_dtypes", {}) if path.is_file() else {}
