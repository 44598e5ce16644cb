"""The non-weight files that make a checkpoint usable: tokenizer, chat template, processor configs.

A model is only usable with the tokenizer ids and image geometry it was trained with. This module
writes them in two places:

* next to our checkpoints (training checkpoints and hf-to-mcore output): ``tokenizer/`` (the
  tokenizer as ``save_pretrained`` writes it, template special tokens included) and
  ``processor.json`` (tile size, tile limits, thumbnail, tokens per tile, chat template settings);
* into Hugging Face exports: the tokenizer with InternVL's named image tokens, a Jinja chat
  template that renders SAIL-VL's ChatML exactly as training did, ``preprocessor_config.json`` /
  ``processor_config.json`` / ``video_preprocessor_config.json`` for ``InternVLProcessor`` and a
  ``generation_config.json`` that stops at ``<|im_end|>``.

InternVL-chat (remote-code) checkpoints carry Python files and their own config; ``SOURCE_DIR``
keeps those byte for byte so that an export can give them back.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Optional

from megatron_sail.config.data import TemplateConfig
from megatron_sail.data import tokenizer as toks
from megatron_sail.data.processor import PROCESSOR_FILE, ProcessorSettings, template_dict

TOKENIZER_DIR = "tokenizer"
SOURCE_DIR = "source_files"
"""Non-weight, non-tokenizer files of an HF source folder (remote code, its config.json, ...)."""
VIDEO_TOKEN = "<video>"
"""InternVLProcessor needs a video placeholder token; SAIL-VL never trains on it."""
IMAGE_PROCESSOR = "GotOcr2ImageProcessor"
"""transformers' InternVL image processor. The base name (not ...Fast / ...Pil) lets
transformers 5 pick its PIL backend when torchvision is absent; transformers 4 reads it as the
slow class."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".distcp")
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def _write_json(path: Path, value: dict) -> None:
    """Write a JSON file atomically (a reader never sees half of it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------ tokenizer
def load_hf_tokenizer(path: str | os.PathLike):
    """A transformers fast tokenizer from a tokenizer.json file or a tokenizer folder."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        return PreTrainedTokenizerFast(tokenizer_file=str(p))
    if p.is_dir() and not (p / "tokenizer_config.json").is_file() and (p / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json"))
    if p.is_dir():
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {p}")
    raise ValueError(f"{p}: only tokenizer.json files and Hugging Face tokenizer folders can be "
                     "written next to a checkpoint (a bare sentencepiece .model cannot)")


def save_tokenizer(src: str | os.PathLike, dst: str | os.PathLike,
                   expected: Optional[dict[str, int]] = None,
                   template: Optional[dict] = None) -> dict[str, int]:
    """Write ``src``'s tokenizer into folder ``dst`` the way save_pretrained does, with the
    template's special tokens added exactly as ``data.tokenizer.load_tokenizer`` adds them
    (same order, so the same ids as the training data), the ChatML chat template and
    InternVL's named image tokens. ``expected`` ({token: id}) is checked. Returns {token: id}."""
    from tokenizers import AddedToken

    tok = load_hf_tokenizer(src)
    vocab = tok.get_vocab()
    missing = [t for t in toks.SPECIAL_TOKENS if t not in vocab]
    if missing:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                       special_tokens=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in toks.SPECIAL_TOKENS}
    wrong = {t: (ids[t], i) for t, i in (expected or {}).items() if ids.get(t) != i}
    if wrong:
        raise ValueError(f"tokenizer {src} gives other ids than the data/model were made with "
                         f"(token: (tokenizer id, expected id)): {wrong}")
    if VIDEO_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(VIDEO_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = toks.PAD
    tok.chat_template = chat_template(template or template_dict(TemplateConfig()))
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(dst))
    _name_image_tokens(dst / "tokenizer_config.json")
    if Path(src).is_dir():
        _copy_side_files(Path(src), dst, vocabulary=not missing)
    return ids


def _copy_side_files(src: Path, dst: Path, vocabulary: bool) -> None:
    """Copy the source folder's generation defaults and, when no template token had to be
    added, its slow-tokenizer files (vocab.json, merges.txt, ...), which then still agree with
    tokenizer.json; files save_pretrained wrote and chat templates (ours replace them) stay."""
    names = ["generation_config.json"]
    if vocabulary:
        names += ["vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                  "special_tokens_map.json"]
    for name in names:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def _name_image_tokens(config_path: Path) -> None:
    """Add InternVL's named tokens (what InternVLProcessor reads from the tokenizer) to
    tokenizer_config.json, in the dict form both transformers 4.5x and 5.x read, and give the
    class a name that both versions know."""
    cfg = json.loads(config_path.read_text())
    named = {"start_image_token": toks.IMG_START, "end_image_token": toks.IMG_END,
             "context_image_token": toks.IMG_CONTEXT, "video_token": VIDEO_TOKEN}
    # load-time options and v5's second copy of the named tokens, which a re-export would
    # otherwise accumulate
    for key in (*named, "model_specific_special_tokens", "is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg["extra_special_tokens"] = named
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if cfg.get("eos_token") is None:
        cfg["eos_token"] = toks.IM_END
    _write_json(config_path, cfg)


def chat_template(template: dict) -> str:
    """Jinja chat template that renders SAIL-VL's ChatML as data/template.py does.

    Each turn is ``<|im_start|>role\\n content <|im_end|>`` + turn separator; an image item (or an
    ``<image>`` placeholder in text) becomes ``<IMG_CONTEXT>`` followed by the image separator,
    which InternVLProcessor expands to ``<img>`` + ``<IMG_CONTEXT>`` x (tiles x tokens) +
    ``</img>``; a configured system prompt is used when the conversation has none."""
    cfg = {f.name: template[f.name] for f in fields(TemplateConfig) if f.name in template}
    system = json.dumps(cfg.get("system_prompt", ""), ensure_ascii=False)
    sep = json.dumps(cfg.get("turn_separator", "\n"), ensure_ascii=False)
    img_sep = json.dumps(cfg.get("image_separator", "\n"), ensure_ascii=False)
    image = json.dumps(toks.IMG_CONTEXT)
    return (
        f"{{%- set default_system = {system} -%}}"
        f"{{%- if messages and messages[0]['role'] != 'system' and default_system -%}}"
        f"{{{{ '{toks.IM_START}system\\n' + default_system + '{toks.IM_END}' + {sep} }}}}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        f"{{{{ '{toks.IM_START}' + message['role'] + '\\n' }}}}"
        "{%- if message['content'] is string -%}"
        f"{{{{ message['content'] | replace('<image>', {image}) }}}}"
        "{%- else -%}{%- for item in message['content'] -%}"
        f"{{%- if item['type'] == 'image' -%}}{{{{ {image} + {img_sep} }}}}"
        "{%- elif item['type'] == 'text' -%}"
        f"{{{{ item['text'] | replace('<image>', {image}) }}}}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        f"{{{{ '{toks.IM_END}' + {sep} }}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ '{toks.IM_START}assistant\\n' }}}}{{%- endif -%}}"
    )


# ------------------------------------------------------------------ HF export side files
def write_processor_files(folder: str | os.PathLike, settings: ProcessorSettings) -> None:
    """preprocessor / processor / video processor configs that InternVLProcessor loads with the
    model's real tile size, tile limits and tokens per tile, plus our processor.json."""
    folder = Path(folder)
    size = {"height": settings.tile_size, "width": settings.tile_size}
    common = {"do_convert_rgb": True, "do_resize": True, "size": size, "resample": 3,
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
              "processor_class": "InternVLProcessor"}
    _write_json(folder / "preprocessor_config.json", {
        **common, "image_processor_type": IMAGE_PROCESSOR, "crop_to_patches": True,
        "min_patches": settings.min_tiles, "max_patches": settings.max_tiles})
    _write_json(folder / "video_preprocessor_config.json",
                {**common, "video_processor_type": "InternVLVideoProcessor"})
    _write_json(folder / "processor_config.json",
                {"processor_class": "InternVLProcessor", "image_seq_length": settings.tokens_per_tile})
    settings.write(folder)


def write_generation_config(folder: str | os.PathLike, ids: dict[str, int]) -> None:
    """generation_config.json: greedy, stop at <|im_end|> or <|endoftext|> (what our generator
    stops at), pad with <|endoftext|>."""
    _write_json(Path(folder) / "generation_config.json", {
        "eos_token_id": [ids[toks.IM_END], ids[toks.PAD]], "pad_token_id": ids[toks.PAD],
        "do_sample": False})


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
        raise ValueError(f"{folder}: the written tokenizer is unusable (size {len(tok)}, "
                         f"{toks.IMG_CONTEXT} id {got}, model's image_token_id {image_token_id})")


# ------------------------------------------------------------------ remote code / source files
def copy_source_files(hf_dir: str | os.PathLike, dst: str | os.PathLike,
                      skip: tuple[str, ...] = ()) -> list[str]:
    """Copy every top-level file of an HF folder that is neither weights nor in ``skip``
    (remote code ``*.py``, its ``config.json``, README, ...) byte for byte into ``dst``."""
    names = []
    for path in sorted(Path(hf_dir).iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in skip:
            Path(dst).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, Path(dst) / path.name)
            names.append(path.name)
    return names


def settings_from_hf(hf_dir: Path, config: dict, tokens_per_tile: int,
                     tile_size: int) -> ProcessorSettings:
    """Processor settings of an HF folder: its processor.json when it has one, else its
    InternVL-chat config fields or transformers processor configs, else SAIL-VL defaults."""
    if (hf_dir / PROCESSOR_FILE).is_file():
        return ProcessorSettings.read(hf_dir / PROCESSOR_FILE)
    out = ProcessorSettings(tile_size=tile_size, tokens_per_tile=tokens_per_tile)
    pre = hf_dir / "preprocessor_config.json"
    if config.get("model_type") == "internvl_chat":
        out.max_tiles = int(config.get("max_dynamic_patch", out.max_tiles))
        out.min_tiles = int(config.get("min_dynamic_patch", out.min_tiles))
        out.use_thumbnail = bool(config.get("use_thumbnail", out.use_thumbnail))
    elif pre.is_file():
        values = json.loads(pre.read_text())
        out.max_tiles = int(values.get("max_patches", out.max_tiles))
        out.min_tiles = int(values.get("min_patches", out.min_tiles))
    return out
