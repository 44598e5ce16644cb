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
  record's ``images`` list (paths or URLs); ``<video>`` tags likewise from ``videos``.

The result is the LLaVA shape the rest of the pipeline validates (``normalize_turns``): turns
with ``<image>`` placeholders, the image references in placeholder order, and the video
references (``<video>`` stays in the text; video.py turns the clip into frames later).
"""

from __future__ import annotations

from megatron_sail.data.preprocess.media_refs import AUDIO_TAG, check_unsupported_media
from megatron_sail.data.preprocess.video import VIDEO_PLACEHOLDER
from megatron_sail.data.template import IMAGE_PLACEHOLDER, SampleError

ROLE_ALIASES = {"developer": "system"}
"""OpenAI's newer name for the system role."""
TEXT_PARTS = ("text", "input_text")
IMAGE_PARTS = ("image", "image_url", "input_image")
VIDEO_PARTS = ("video", "video_url", "input_video")
AUDIO_PARTS = ("audio", "input_audio", "audio_url")
INLINE_IMAGE_KEYS = ("image", "url", "path", "base64")
"""Keys of a Hugging Face ``{"type": "image"}`` part that carry the image itself."""
INLINE_VIDEO_KEYS = ("video", "path", "url")
"""Keys of a ``{"type": "video"}`` part that carry the clip's path."""


class _ImageQueue:
    """A record's top-level ``images`` (or ``videos``) list, consumed in placeholder order."""

    def __init__(self, images: object, key: str = "images"):
        if images is None:
            images = []
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list):
            raise SampleError("bad_sample", f"'{key}' is {type(images).__name__}, expected a list")
        self.items, self.used, self.key = images, 0, key

    def take(self, where: str) -> object:
        if self.used >= len(self.items):
            raise SampleError(
                "placeholder_mismatch",
                f"{where} needs {self.key[:-1]} {self.used + 1} but '{self.key}' has {len(self.items)}",
            )
        self.used += 1
        return self.items[self.used - 1]


class _Media:
    """Both queues of a record and the references taken so far, in placeholder order."""

    def __init__(self, obj: dict):
        self.images = _ImageQueue(obj.get("images"))
        self.videos = _ImageQueue(obj.get("videos"), "videos")
        self.refs: list = []
        self.video_refs: list = []


def _part_video(part: dict, media: _Media, where: str) -> object:
    """The clip a video part names (inline path), or the next one of ``videos``."""
    value = part.get("video_url") if part.get("type") == "video_url" else None
    url = value.get("url") if isinstance(value, dict) else value
    if isinstance(url, str) and url:
        return url
    for key in INLINE_VIDEO_KEYS:
        value = part.get(key)
        if isinstance(value, str) and value:
            return value
        if value is not None:
            raise SampleError(
                "video_unsupported",
                f"{where}: video part '{key}' is {type(value).__name__} (a list of frames?), not a path",
            )
    return media.videos.take(where)


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


def _content_text(content: object, media: _Media, where: str, separator: str) -> str:
    """One message's text with ``<image>`` / ``<video>`` placeholders; records their references."""
    if isinstance(content, str):
        for _ in range(content.count(IMAGE_PLACEHOLDER)):
            media.refs.append(media.images.take(where))
        for _ in range(content.count(VIDEO_PLACEHOLDER)):
            media.video_refs.append(media.videos.take(where))
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
            pieces.append(_content_text(text, media, at, separator))
        elif kind in IMAGE_PARTS:
            media.refs.append(_part_image(part, media.images, at))
            pieces.append(IMAGE_PLACEHOLDER + separator)
        elif kind in VIDEO_PARTS:
            media.video_refs.append(_part_video(part, media, at))
            pieces.append(VIDEO_PLACEHOLDER + separator)
        elif kind in AUDIO_PARTS:
            raise SampleError("audio_unsupported", f"{at}: '{kind}' part")
        else:
            raise SampleError("bad_sample", f"{at}: unknown content part type {kind!r}")
    return "".join(pieces)


def messages_conversation(obj: dict, separator: str = "\n") -> tuple[list[dict], list, list]:
    """(LLaVA-style turns, image references in placeholder order, video references) of a
    ``messages`` record.

    ``separator`` follows each image part (the text after an image block, as when a missing
    placeholder is prepended). Images of the top-level list that no placeholder or part asks
    for are kept when the record has no placeholder at all (the template then puts them at the
    start of the first user turn, as for LLaVA records); otherwise the count mismatch is a reject.
    """
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SampleError("bad_sample", "no 'messages' list")
    texts = [m.get("content") for m in messages if isinstance(m, dict)]
    check_unsupported_media(obj, [t for t in texts if isinstance(t, str)], video_ok=True)
    media = _Media(obj)
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise SampleError("bad_sample", f"message {i} is not an object")
        role = msg.get("role")
        role = ROLE_ALIASES.get(role, role)
        content = msg.get("content")
        if msg.get("weight", 1) != 1:  # OpenAI fine-tuning: weight 0 = do not train this turn
            raise SampleError(
                "message_weight_unsupported",
                f"message {i} has weight {msg.get('weight')!r}; "
                "every assistant turn is trained (drop the turn or the weight)",
            )
        if content is None:
            raise SampleError(
                "bad_sample",
                f"message {i} ({role}) has no content"
                + (" (tool calls are not trained on)" if msg.get("tool_calls") else ""),
            )
        text = _content_text(content, media, f"message {i}", separator)
        if AUDIO_TAG in text:
            check_unsupported_media({}, [text])
        turns.append({"from": role, "value": text})
    refs, videos = media.refs, media.video_refs
    for queue, taken in ((media.images, refs), (media.videos, videos)):
        if queue.used < len(queue.items):
            if taken:
                raise SampleError(
                    "placeholder_mismatch",
                    f"{len(taken)} {queue.key} placeholders, {len(queue.items)} in '{queue.key}'",
                )
            taken.extend(queue.items)  # no placeholder at all: put at the start of the first user turn
    return turns, refs, videos
