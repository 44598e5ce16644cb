"""The non-weight files that make a Hugging Face export usable: processor and generation configs.

A model is only usable with the tokenizer ids and image geometry it was trained with. Our own
checkpoints keep them as ``tokenizer/`` and ``processor.json`` (checkpoint/tokenizer.py,
checkpoint/processor.py). A Hugging Face export gets the tokenizer the same way
(``save_tokenizer``, with InternVL's named image tokens and the ChatML Jinja template) and, from
this module, ``preprocessor_config.json`` / ``processor_config.json`` /
``video_preprocessor_config.json`` for ``InternVLProcessor`` and a ``generation_config.json``
that stops at ``<|im_end|>``.

InternVL-chat (remote-code) checkpoints carry Python files and their own config; ``SOURCE_DIR``
(checkpoint/layout.py) keeps those byte for byte so that an export can give them back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megatron_sail.checkpoint.layout import HF_GENERATION_FILE, HF_PREPROCESSOR_FILE, PROCESSOR_FILE
from megatron_sail.checkpoint.processor import ProcessorSettings
from megatron_sail.checkpoint.tokenizer import write_json
from megatron_sail.data import tokenizer as toks

IMAGE_PROCESSOR = "GotOcr2ImageProcessor"
"""transformers' InternVL image processor. The base name (not ...Fast / ...Pil) lets
transformers 5 pick its PIL backend when torchvision is absent; transformers 4 reads it as the
slow class."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".distcp")
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------ HF export side files
def write_processor_files(folder: str | os.PathLike, settings: ProcessorSettings) -> None:
    """preprocessor / processor / video processor configs that InternVLProcessor loads with the
    model's real tile size, tile limits and tokens per tile, plus our processor.json."""
    folder = Path(folder)
    size = {"height": settings.tile_size, "width": settings.tile_size}
    common = {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": size,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "processor_class": "InternVLProcessor",
    }
    write_json(
        folder / HF_PREPROCESSOR_FILE,
        {
            **common,
            "image_processor_type": IMAGE_PROCESSOR,
            "crop_to_patches": True,
            "min_patches": settings.min_tiles,
            "max_patches": settings.max_tiles,
        },
    )
    write_json(
        folder / "video_preprocessor_config.json",
        {**common, "video_processor_type": "InternVLVideoProcessor"},
    )
    write_json(
        folder / "processor_config.json",
        {"processor_class": "InternVLProcessor", "image_seq_length": settings.tokens_per_tile},
    )
    settings.write(folder)


def write_generation_config(folder: str | os.PathLike, ids: dict[str, int]) -> None:
    """generation_config.json: greedy, stop at <|im_end|> or <|endoftext|> (what our generator
    stops at), pad with <|endoftext|>."""
    write_json(
        Path(folder) / HF_GENERATION_FILE,
        {
            "eos_token_id": [ids[toks.IM_END], ids[toks.PAD]],
            "pad_token_id": ids[toks.PAD],
            "do_sample": False,
        },
    )


def check_tokenizer(folder: str | os.PathLike, image_token_id: int) -> None:
    """Load the written tokenizer the way users do (AutoTokenizer) and refuse a folder whose
    tokenizer is empty or names the image token with another id than the model config: without
    tokenizer files AutoTokenizer silently builds an empty tokenizer."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: the written tokenizer is unusable: AutoTokenizer fails ({e})") from e
    got = tok.convert_tokens_to_ids(toks.IMG_CONTEXT)
    if len(tok) <= len(toks.SPECIAL_TOKENS) or got != image_token_id or not tok.encode("a b"):
        raise ValueError(
            f"{folder}: the written tokenizer is unusable (size {len(tok)}, "
            f"{toks.IMG_CONTEXT} id {got}, model's image_token_id {image_token_id})"
        )


# ------------------------------------------------------------------ remote code / source files
def copy_source_files(
    hf_dir: str | os.PathLike, dst: str | os.PathLike, skip: tuple[str, ...] = ()
) -> list[str]:
    """Copy every top-level file of an HF folder that is neither weights nor in ``skip``
    (remote code ``*.py``, its ``config.json``, README, ...) byte for byte into ``dst``."""
    names = []
    for path in sorted(Path(hf_dir).iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in skip:
            Path(dst).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, Path(dst) / path.name)
            names.append(path.name)
    return names


def settings_from_hf(hf_dir: Path, config: dict, tokens_per_tile: int, tile_size: int) -> ProcessorSettings:
    """Processor settings of an HF folder: its processor.json when it has one, else its
    InternVL-chat config fields or transformers processor configs, else SAIL-VL defaults."""
    if (hf_dir / PROCESSOR_FILE).is_file():
        return ProcessorSettings.read(hf_dir / PROCESSOR_FILE)
    out = ProcessorSettings(tile_size=tile_size, tokens_per_tile=tokens_per_tile)
    pre = hf_dir / HF_PREPROCESSOR_FILE
    if config.get("model_type") == "internvl_chat":
        out.max_tiles = int(config.get("max_dynamic_patch", out.max_tiles))
        out.min_tiles = int(config.get("min_dynamic_patch", out.min_tiles))
        out.use_thumbnail = bool(config.get("use_thumbnail", out.use_thumbnail))
    elif pre.is_file():
        values = json.loads(pre.read_text())
        out.max_tiles = int(values.get("max_patches", out.max_tiles))
        out.min_tiles = int(values.get("min_patches", out.min_tiles))
    return out
