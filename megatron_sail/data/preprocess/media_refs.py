"""Image references in input records: which keys hold images, inline ``data:`` URIs, remote URLs,
and media we do not train on (video, audio).

Why one module: every JSON input format (LLaVA/InternVL, caption pairs, chat ``messages``) names
its images in a few different ways, and none of them may lose an image silently. A record either
yields every image it names, or it is rejected with a reason (``remote_url``,
``video_unsupported``, ``audio_unsupported``, ``file_too_large``, ``undecodable_image``).
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from typing import Optional

from megatron_sail.config.data import DEFAULT_MAX_IMAGE_BYTES
from megatron_sail.data.template import SampleError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
VIDEO_KEYS = ("video", "videos")
AUDIO_KEYS = ("audio", "audios")
VIDEO_TAG = "<video>"
AUDIO_TAG = "<audio>"


def decode_data_uri(uri: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """Bytes of a ``data:[<mediatype>][;base64],<data>`` URI (RFC 2397), capped like image files
    (--max-image-bytes); the cap is checked on the encoded length before decoding, so a huge
    string is refused without allocating its decoded copy."""
    header, sep, body = uri.partition(",")
    if not sep:
        raise SampleError("undecodable_image", "data: URI without a ',' before its data")
    is_b64 = header.lower().endswith(";base64")
    estimate = len(body) * 3 // 4 if is_b64 else len(body)
    if estimate > max_bytes:
        raise SampleError(
            "file_too_large", f"data: URI holds ~{estimate} bytes > --max-image-bytes {max_bytes}"
        )
    if not is_b64:
        return urllib.parse.unquote_to_bytes(body)
    try:
        data = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise SampleError("undecodable_image", f"data: URI is not valid base64 ({e})") from e
    if not data:
        raise SampleError("truncated_image", "data: URI holds no bytes")
    return data


def plain_ref(ref: object) -> object:
    """A Hugging Face ``Image`` feature as JSON datasets export it (``{"bytes", "path"}``) as the
    string form: its base64 ``bytes`` as a data: URI, else its ``path``; other values unchanged."""
    if not isinstance(ref, dict):
        return ref
    data, path = ref.get("bytes"), ref.get("path")
    if isinstance(data, str) and data:
        return data if data.startswith("data:") else "data:;base64," + data
    if isinstance(path, str) and path:
        return path
    raise SampleError(
        "bad_sample", f"image reference is an object with keys {sorted(ref)} and no base64 'bytes' or 'path'"
    )


def inline_image(ref: object, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Optional[bytes]:
    """Bytes of an inline image; None when ``ref`` is a local path for the file reader.

    A remote URL (``http://``, ``https://``, ``s3://``, ...) is a ``remote_url`` reject:
    preprocessing never downloads (fetch the images first, e.g. with img2dataset).
    """
    if isinstance(ref, dict):
        raise SampleError("bad_sample", f"image reference is an object with keys {sorted(ref)}")
    if not isinstance(ref, str):
        return None
    if ref[:5].lower() == "data:":
        return decode_data_uri(ref, max_bytes)
    m = _SCHEME.match(ref)
    if m and m.group(1).lower() != "file":
        raise SampleError("remote_url", ref[:200])
    return None


def local_path(ref: str) -> str:
    """A ``file://`` URI as a plain path; any other string unchanged."""
    return urllib.parse.unquote(ref[7:]) if ref[:7].lower() == "file://" else ref


def image_field(obj: dict) -> list:
    """The image references of a LLaVA / InternVL / caption record, in order.

    ``image`` (str or list, InternVL and LLaVA) and ``images`` (list, ms-swift and many HF
    exports) are both read; a record keyed ``url`` without a local image is a web-scale caption
    list that still has to be downloaded (``remote_url``).
    """
    if "image" in obj and "images" in obj and obj["image"] and obj["images"]:
        raise SampleError("bad_sample", "both 'image' and 'images' are set")
    value = obj.get("image") or obj.get("images")
    if value is None or value == [] or value == "":
        url = obj.get("url")
        if isinstance(url, str) and url:
            raise SampleError("remote_url", f"'url' {url[:200]} (download the images first)")
        return []
    refs = [value] if isinstance(value, (str, dict)) else value  # a dict: one HF Image value
    if not isinstance(refs, list):
        raise SampleError("bad_sample", f"'image' is {type(value).__name__}")
    return refs


def check_unsupported_media(obj: dict, texts: list[str], video_ok: bool = False) -> None:
    """Reject video and audio samples instead of training on their text alone (``video_ok``:
    the caller reads the record's video fields and ``<video>`` tags, see video.py)."""
    for key in VIDEO_KEYS:
        if obj.get(key) and not video_ok:
            raise SampleError("video_unsupported", f"'{key}' field (video samples are not supported)")
    for key in AUDIO_KEYS:
        if obj.get(key):
            raise SampleError("audio_unsupported", f"'{key}' field (audio samples are not supported)")
    for text in texts:
        if isinstance(text, str) and VIDEO_TAG in text and not video_ok:
            raise SampleError("video_unsupported", f"{VIDEO_TAG} placeholder in the text")
        if isinstance(text, str) and AUDIO_TAG in text:
            raise SampleError("audio_unsupported", f"{AUDIO_TAG} placeholder in the text")
