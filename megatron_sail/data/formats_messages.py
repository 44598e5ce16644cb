"""Chat ``messages`` records: OpenAI chat completions, Hugging Face chat content parts, ms-swift.

All three store a sample as ``{"messages": [{"role", "content"}, ...]}``; they differ in where
images live (shapes as documented by each project, see docs/data.md "Inputs"):

- OpenAI chat completions / fine-tuning JSONL: ``content`` is a string or a list of parts,
  ``{"type": "text", "text"}`` and ``{"type": "image_url", "image_url": {"url"}}`` (the URL may be
  a ``data:image/...;base64,`` URI).
- Hugging Face chat templates (transformers ``apply_chat_template``, TRL VLM datasets): parts
  ``{"type": "image"}``, either carrying the image (``image`` / ``url`` / ``path`` / ``base64``
  key) or filled in order from the record's top-level ``images`` list.
- ms-swift custom datasets: string contents with ``<image>`` tags, filled in order from the
  record's ``images`` list (paths or URLs); ``videos`` / ``audios`` are other modalities.

The result is the LLaVA shape the rest of the pipeline validates (``normalize_turns``): turns
with ``<image>`` placeholders, and the image references in placeholder order.
"""
from __future__ import annotations

from megatron_sail.data.media_refs import AUDIO_TAG, VIDEO_TAG, check_unsupported_media
from megatron_sail.data.template import IMAGE_PLACEHOLDER, SampleError

ROLE_ALIASES = {"developer": "system"}
"""OpenAI's newer name for the system role."""
TEXT_PARTS = ("text", "input_text")
IMAGE_PARTS = ("image", "image_url", "input_image")
VIDEO_PARTS = ("video", "video_url", "input_video")
AUDIO_PARTS = ("audio", "input_audio", "audio_url")
INLINE_IMAGE_KEYS = ("image", "url", "path", "base64")
"""Keys of a Hugging Face ``{"type": "image"}`` part that carry the image itself."""


class _ImageQueue:
    """The record's top-level ``images`` list, consumed in placeholder order."""

    def __init__(self, images: object):
        if images is None:
            images = []
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list):
            raise SampleError("bad_sample", f"'images' is {type(images).__name__}, expected a list")
        self.items, self.used = images, 0

    def take(self, where: str) -> object:
        if self.used >= len(self.items):
            raise SampleError("placeholder_mismatch", f"{where} needs image {self.used + 1} but "
                                                      f"'images' has {len(self.items)}")
        self.used += 1
        return self.items[self.used - 1]


def _part_image(part: dict, queue: _ImageQueue, where: str) -> object:
    """The image an image part names (inline), or the next one of the top-level list."""
    kind = part.get("type")
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise SampleError("bad_sample", f"{where}: image_url part without a url")
        return url
    if kind == "input_image":  # OpenAI Responses-style part: image_url is a plain string
        url = part.get("image_url")
        if isinstance(url, str) and url:
            return url
    for key in INLINE_IMAGE_KEYS:
        value = part.get(key)
        if isinstance(value, str) and value:
            if key == "base64" and not value.startswith("data:"):
                return "data:image;base64," + value
            return value
        if value is not None and key in ("image", "url", "path"):
            raise SampleError("bad_sample", f"{where}: image part '{key}' is {type(value).__name__}")
    return queue.take(where)


def _content_text(content: object, queue: _ImageQueue, refs: list, where: str,
                  separator: str) -> str:
    """One message's text with ``<image>`` placeholders; appends its images to ``refs``."""
    if isinstance(content, str):
        for _ in range(content.count(IMAGE_PLACEHOLDER)):
            refs.append(queue.take(where))
        return content
    if not isinstance(content, list):
        raise SampleError("bad_sample", f"{where}: content is {type(content).__name__}")
    pieces = []
    for k, part in enumerate(content):
        at = f"{where} part {k}"
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, dict):
            raise SampleError("bad_sample", f"{at} is not an object")
        kind = part.get("type")
        if kind in TEXT_PARTS:
            text = part.get("text", part.get("content"))
            if not isinstance(text, str):
                raise SampleError("bad_sample", f"{at}: text part without text")
            pieces.append(_content_text(text, queue, refs, at, separator))
        elif kind in IMAGE_PARTS:
            refs.append(_part_image(part, queue, at))
            pieces.append(IMAGE_PLACEHOLDER + separator)
        elif kind in VIDEO_PARTS:
            raise SampleError("video_unsupported", f"{at}: '{kind}' part")
        elif kind in AUDIO_PARTS:
            raise SampleError("audio_unsupported", f"{at}: '{kind}' part")
        else:
            raise SampleError("bad_sample", f"{at}: unknown content part type {kind!r}")
    return "".join(pieces)


def messages_conversation(obj: dict, separator: str = "\n") -> tuple[list[dict], list]:
    """(LLaVA-style turns, image references in placeholder order) of a ``messages`` record.

    ``separator`` follows each image part (the text after an image block, as when a missing
    placeholder is prepended). Images of the top-level list that no placeholder or part asks
    for are kept when the record has no placeholder at all (the template then puts them at the
    start of the first user turn, as for LLaVA records); otherwise the count mismatch is a reject.
    """
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SampleError("bad_sample", "no 'messages' list")
    texts = [m.get("content") for m in messages if isinstance(m, dict)]
    check_unsupported_media(obj, [t for t in texts if isinstance(t, str)])
    queue = _ImageQueue(obj.get("images"))
    turns, refs = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise SampleError("bad_sample", f"message {i} is not an object")
        role = msg.get("role")
        role = ROLE_ALIASES.get(role, role)
        content = msg.get("content")
        if content is None:
            raise SampleError("bad_sample", f"message {i} ({role}) has no content"
                              + (" (tool calls are not trained on)" if msg.get("tool_calls") else ""))
        text = _content_text(content, queue, refs, f"message {i}", separator)
        if VIDEO_TAG in text or AUDIO_TAG in text:
            check_unsupported_media({}, [text])
        turns.append({"from": role, "value": text})
    if queue.used < len(queue.items):
        if refs:
            raise SampleError("placeholder_mismatch", f"{len(refs)} image placeholders, "
                                                      f"{len(queue.items)} images in 'images'")
        refs = list(queue.items)
    return turns, refs
