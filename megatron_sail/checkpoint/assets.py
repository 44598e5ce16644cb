"""What a training checkpoint records besides weights: the tokenizer and processor settings.

Every checkpoint directory gets ``tokenizer/`` (the tokenizer the training data was made with,
special tokens included, as ``save_pretrained`` writes it) and ``processor.json`` (tile size, tile
limits, thumbnail, tokens per tile, template), so that generation and ``mcore-to-hf`` need no
extra flags. Both come from the first training prefix's meta.json (all blended prefixes share
token ids; the dataset checks that). When the run started from a converted InternVL-chat
checkpoint (``--init-from``), its ``source_files/`` (remote code + config) is carried along too.

A checkpoint is all its parts or nothing: when one of them cannot be written (a full disk, a
tokenizer that moved since the run started, a meta.json without tiling), the save fails with an
error naming it, the checkpoint is not published and ``latest`` keeps naming the previous one. A
published checkpoint without its tokenizer would break generate and export later, far from here.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from functools import lru_cache
from typing import Optional

from megatron_sail.checkpoint.layout import PROCESSOR_FILE, SOURCE_DIR, TOKENIZER_DIR, resolve_checkpoint
from megatron_sail.checkpoint.processor import ProcessorSettings
from megatron_sail.checkpoint.tokenizer import save_tokenizer
from megatron_sail.config.stage import POST_TRAINING
from megatron_sail.data import tokenizer as toks
from megatron_sail.data.loading.dataset import parse_data_path


def write_checkpoint_assets(ckpt_dir: str, config: Optional[dict]) -> None:
    """Rank 0, into the not yet published checkpoint dir: tokenizer/, processor.json and the
    init checkpoint's source_files/ (when it has them)."""
    if not config:
        return
    meta_path = _meta_path(config)
    if meta_path is not None and not os.path.isfile(meta_path):
        if (config.get("stage") or {}).get("name") not in POST_TRAINING:
            raise FileNotFoundError(
                f"checkpoint {ckpt_dir}: {TOKENIZER_DIR}/ not written: the training data's "
                f"{meta_path} is gone (moved or deleted since the run started)"
            )
        meta_path = None  # post-training stages read JSONL: the assets come from --init-from
        _copy_init_assets(config, ckpt_dir)
    if meta_path is not None:
        with open(meta_path) as f:
            meta = json.load(f)
        try:
            settings = ProcessorSettings.from_meta(meta)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"checkpoint {ckpt_dir}: {PROCESSOR_FILE} not written: {meta_path} "
                f"lacks its tiling/tokenizer fields ({e})"
            ) from None
        settings.write(ckpt_dir)
        _copy_tree(
            _tokenizer_files(meta_path, os.path.getmtime(meta_path)), os.path.join(ckpt_dir, TOKENIZER_DIR)
        )
    source = _init_source_files(config)
    if source is not None:
        _copy_tree(source, os.path.join(ckpt_dir, SOURCE_DIR))


def _meta_path(config: dict) -> Optional[str]:
    """meta.json of the first training prefix named in the run config, if any."""
    data_path = (config.get("data") or {}).get("data_path")
    if not data_path:
        return None
    prefixes, _ = parse_data_path(data_path)
    return f"{prefixes[0]}.meta.json"


def resolve_tokenizer_path(meta_path: str, recorded: str) -> str:
    """The tokenizer a dataset's meta.json records: absolute since preprocessing records it so;
    an older relative path is tried from here, then from the dataset's folder. Unresolvable is
    an error naming both, raised when a run starts rather than a warning at its first save."""
    candidates = (
        [recorded]
        if os.path.isabs(recorded)
        else [recorded, os.path.join(os.path.dirname(os.path.abspath(meta_path)), recorded)]
    )
    for path in candidates:
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"{meta_path}: the tokenizer it records ({recorded}) is not found (tried "
        f"{', '.join(candidates)}); checkpoints need it for generate and export. Preprocess "
        "again (paths are recorded absolute now) or put the tokenizer there"
    )


@lru_cache(maxsize=4)
def _tokenizer_files(meta_path: str, mtime: float) -> str:
    """A folder (made once per process and dataset) holding the saved tokenizer; later
    checkpoints copy it instead of re-serializing a 150k-token vocabulary each time."""
    with open(meta_path) as f:
        meta = json.load(f)
    block = meta["tokenizer"]
    path = resolve_tokenizer_path(meta_path, block["path"])
    expected = {
        toks.IMG_CONTEXT: block["img_context_id"],
        toks.IMG_START: block["img_start_id"],
        toks.IMG_END: block["img_end_id"],
        toks.IM_START: block["im_start_id"],
        toks.IM_END: block["im_end_id"],
        toks.PAD: block["pad_id"],
    }
    out = tempfile.mkdtemp(prefix="sail_tokenizer_")
    atexit.register(shutil.rmtree, out, True)
    save_tokenizer(path, out, expected, meta.get("template"))
    return out


def _init_source_files(config: dict) -> Optional[str]:
    """source_files/ of the --init-from checkpoint (a converted HF checkpoint or a training
    checkpoint that carries one), so the chat layout's remote code survives training stages."""
    init = (config.get("checkpoint") or {}).get("init_from")
    if not init or not os.path.isdir(init):
        return None
    try:
        ckpt = resolve_checkpoint(init)
    except (OSError, ValueError):
        return None
    source = os.path.join(ckpt, SOURCE_DIR) if ckpt else None
    return source if source and os.path.isdir(source) else None


def _copy_init_assets(config: dict, ckpt_dir: str) -> None:
    """tokenizer/ and processor.json of the --init-from (or --load) checkpoint, when the run's
    data has no meta.json (stages dpo and grpo tokenize JSONL with the checkpoint's tokenizer)."""
    c = config.get("checkpoint") or {}
    for root in (c.get("init_from"), c.get("load")):
        try:
            ckpt = resolve_checkpoint(root) if root and os.path.isdir(root) else None
        except (OSError, ValueError):
            ckpt = None
        if ckpt is None or not os.path.isdir(os.path.join(ckpt, TOKENIZER_DIR)):
            continue
        _copy_tree(os.path.join(ckpt, TOKENIZER_DIR), os.path.join(ckpt_dir, TOKENIZER_DIR))
        if os.path.isfile(os.path.join(ckpt, PROCESSOR_FILE)):
            shutil.copy2(os.path.join(ckpt, PROCESSOR_FILE), os.path.join(ckpt_dir, PROCESSOR_FILE))
        return
    raise FileNotFoundError(
        f"checkpoint {ckpt_dir}: {TOKENIZER_DIR}/ not written: neither the --init-from "
        f"({c.get('init_from')}) nor the --load ({c.get('load')}) checkpoint holds one (moved or "
        "deleted since the run started?); a checkpoint without it breaks generate and export"
    )


def _copy_tree(src: str, dst: str) -> None:
    """Copy a folder, replacing an older copy."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
