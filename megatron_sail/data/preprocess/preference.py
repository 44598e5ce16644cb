"""Preference pairs from JSONL: one prompt (with its images), a chosen and a rejected answer.

Accepted record shapes (detected per record):

* InternVL MPO / MMPR: ``{"image": "a.jpg" | [..], "question": "...", "chosen": "...",
  "rejected": "..."}`` (``image`` optional for text pairs);
* generic: ``{"images": [..], "prompt": "...", "chosen": "...", "rejected": "..."}``;
* ms-swift RLHF: ``{"messages": [..., {"role": "assistant", "content": chosen}],
  "rejected_response": "...", "images": [..]}``; every message before the last assistant turn
  is the prompt (several turns allowed), content parts and placeholders as for SFT data.

A record that cannot be a pair is a reject with a reason (counted and written next to the
output, as preprocessing does): not JSON, missing or empty fields, chosen == rejected, an image
that cannot be read, placeholder count mismatch, too long for one row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

from megatron_sail.data.template import SampleError


@dataclass
class PreferencePair:
    """One parsed pair, before tokenization."""

    turns: list[dict]
    """Prompt turns, LLaVA style ({'from': human|gpt|system, 'value': text}); last is human."""
    images: list[bytes]
    """Encoded image bytes in placeholder order."""
    chosen: str
    """Preferred answer."""
    rejected: str
    """Dispreferred answer."""
    source: str = ""
    """'<file>:<line>' for messages and rejects."""


@dataclass
class Reject:
    """A record that is not a usable pair."""

    source: str
    """'<file>:<line>'."""
    reason: str
    """Short key (bad_json, missing_field, same_answers, missing_image, placeholder_mismatch,
    too_long, ...)."""
    detail: str = ""
    """One line of detail."""


@dataclass
class PairFile:
    """Where pairs come from."""

    paths: list[str] = field(default_factory=list)
    """JSONL files."""
    image_root: Optional[str] = None
    """Folder relative image paths are resolved against (default: each file's folder)."""


def _text(obj: dict, key: str) -> str:
    """A non-empty string field, or a missing_field reject."""
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SampleError("missing_field", f"'{key}' is missing or empty")
    return value


def _image_refs(obj: dict) -> list:
    """The record's image references (``image`` or ``images``, one or a list)."""
    refs = obj.get("images", obj.get("image"))
    if refs is None or refs == "":
        return []
    return list(refs) if isinstance(refs, (list, tuple)) else [refs]


def _load_images(refs: list, base_dir: str) -> list[bytes]:
    """Image bytes of each reference (files under base_dir, data: URIs), missing_image else."""
    from megatron_sail.data.preprocess.formats import _load_image  # the SFT reader's rules (root, size)

    out = []
    for ref in refs:
        if isinstance(ref, dict):  # ms-swift / HF: {"path": ...} or {"image": ...}
            ref = ref.get("path", ref.get("image", ref.get("url")))
        try:
            out.append(bytes(_load_image(ref, base_dir)))
        except SampleError:
            raise
        except (OSError, ValueError, TypeError) as e:
            raise SampleError("missing_image", f"{str(ref)[:120]}: {e}") from None
    return out


def parse_pair(obj: object, base_dir: str, source: str) -> PreferencePair:
    """One record -> PreferencePair (any accepted shape); SampleError names what is wrong."""
    if not isinstance(obj, dict):
        raise SampleError("bad_sample", "a record must be a JSON object")
    if "messages" in obj:
        return _swift_pair(obj, base_dir, source)
    prompt = obj.get("question", obj.get("prompt"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise SampleError("missing_field", "no 'question' / 'prompt' text")
    chosen, rejected = _text(obj, "chosen"), _text(obj, "rejected")
    _check_distinct(chosen, rejected)
    images = _load_images(_image_refs(obj), base_dir)
    return PreferencePair([{"from": "human", "value": prompt}], images, chosen, rejected, source)


def _swift_pair(obj: dict, base_dir: str, source: str) -> PreferencePair:
    """ms-swift: messages ending with the chosen assistant turn, plus rejected_response."""
    from megatron_sail.data.preprocess.formats_messages import messages_conversation

    rejected = _text(obj, "rejected_response")
    turns, refs, videos = messages_conversation(obj)
    if videos:
        raise SampleError("video_unsupported", "preference pairs with videos are not supported")
    if not turns or turns[-1]["from"] not in ("assistant", "gpt"):
        raise SampleError("no_assistant_turn", "the last message must be the chosen assistant answer")
    chosen = turns[-1]["value"]
    if not chosen.strip():
        raise SampleError("missing_field", "the chosen assistant answer is empty")
    _check_distinct(chosen, rejected)
    return PreferencePair(turns[:-1], _load_images(refs, base_dir), chosen, rejected, source)


def _check_distinct(chosen: str, rejected: str) -> None:
    """A pair whose answers are equal teaches nothing (and DPO's gradient is zero on it)."""
    if chosen.strip() == rejected.strip():
        raise SampleError("same_answers", "chosen and rejected answers are identical")


def read_pairs(cfg: PairFile) -> Iterator[Union[PreferencePair, Reject]]:
    """Every record of every file in order: a PreferencePair or a Reject."""
    for path in cfg.paths:
        base = cfg.image_root or os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Reject(where, "bad_json", str(e))
                    continue
                try:
                    yield parse_pair(obj, base, where)
                except SampleError as e:
                    yield Reject(where, e.reason, e.detail)
