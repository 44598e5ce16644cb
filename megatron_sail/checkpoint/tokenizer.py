"""The ``tokenizer/`` folder of a checkpoint: the training data's tokenizer as ``save_pretrained``
writes it, with the template's special tokens added in the order training added them (so the
ids are the training data's), SAIL-VL's ChatML as a Jinja chat template and InternVL's named
image tokens. Training checkpoints (checkpoint/assets.py), conversions and Hugging Face exports
(convert/hf_assets.py) all write their tokenizer through ``save_tokenizer``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Optional

from megatron_sail.checkpoint.processor import template_dict
from megatron_sail.config.data import TemplateConfig
from megatron_sail.data import tokenizer as toks

VIDEO_TOKEN = "<video>"
"""InternVLProcessor needs a video placeholder token; SAIL-VL never trains on it."""


def write_json(path: Path, value: dict) -> None:
    """Write a JSON file atomically (a reader never sees half of it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
    raise ValueError(
        f"{p}: only tokenizer.json files and Hugging Face tokenizer folders can be "
        "written next to a checkpoint (a bare sentencepiece .model cannot)"
    )


def save_tokenizer(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    expected: Optional[dict[str, int]] = None,
    template: Optional[dict] = None,
) -> dict[str, int]:
    """Write ``src``'s tokenizer into folder ``dst`` the way save_pretrained does, with the
    template's special tokens added exactly as ``data.tokenizer.load_tokenizer`` adds them
    (same order, so the same ids as the training data), the ChatML chat template and
    InternVL's named image tokens. ``expected`` ({token: id}) is checked. Returns {token: id}."""
    from tokenizers import AddedToken

    tok = load_hf_tokenizer(src)
    vocab = tok.get_vocab()
    missing = [t for t in toks.SPECIAL_TOKENS if t not in vocab]
    if missing:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in toks.SPECIAL_TOKENS}
    wrong = {t: (ids[t], i) for t, i in (expected or {}).items() if ids.get(t) != i}
    if wrong:
        raise ValueError(
            f"tokenizer {src} gives other ids than the data/model were made with "
            f"(token: (tokenizer id, expected id)): {wrong}"
        )
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
        names += [
            "vocab.json",
            "merges.txt",
            "tokenizer.model",
            "added_tokens.json",
            "special_tokens_map.json",
        ]
    for name in names:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def _name_image_tokens(config_path: Path) -> None:
    """Add InternVL's named tokens (what InternVLProcessor reads from the tokenizer) to
    tokenizer_config.json, in the dict form both transformers 4.5x and 5.x read, and give the
    class a name that both versions know."""
    cfg = json.loads(config_path.read_text())
    named = {
        "start_image_token": toks.IMG_START,
        "end_image_token": toks.IMG_END,
        "context_image_token": toks.IMG_CONTEXT,
        "video_token": VIDEO_TOKEN,
    }
    # load-time options and v5's second copy of the named tokens, which a re-export would
    # otherwise accumulate
    for key in (*named, "model_specific_special_tokens", "is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg["extra_special_tokens"] = named
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if cfg.get("eos_token") is None:
        cfg["eos_token"] = toks.IM_END
    write_json(config_path, cfg)


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
