"""Input readers: LLaVA/InternVL conversations, caption pairs, img2dataset WebDataset shards.

Reading is split in two so it parallelizes: the main process only enumerates raw records
(a JSONL line, an array element, a tar sample's member bytes) in a fixed order; the workers
parse them (``to_conversation``) into LLaVA-style turns plus image bytes. Every parse failure
becomes a ``SampleError`` with a reason key, never an exception that stops the run.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

from megatron_sail.config.data import TemplateConfig
from megatron_sail.data.template import SampleError

FORMATS = ("llava", "caption", "webdataset")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass
class RawRecord:
    """One input record before parsing, with where it came from (for the reject report)."""

    source: str
    """Input file path."""
    key: str
    """Location within the file: 'line N', 'item N' or the WebDataset sample key."""
    payload: object
    """A JSONL line (str), a parsed JSON element, or {extension: bytes} for WebDataset."""
    base_dir: str
    """Directory relative image paths resolve against."""
    error: Optional[str] = None
    """Set when the reader itself already found the record broken (e.g. a truncated tar)."""


class ImageBlob(bytes):
    """Image bytes that remember where they came from: ("file", path) or ("member", extension).

    With several workers, a worker returns only this origin for images stored unchanged, and
    the writer process re-reads them, instead of sending every image's bytes through a pipe.
    """

    origin: tuple[str, str]

    @classmethod
    def make(cls, data: bytes, origin: tuple[str, str]) -> "ImageBlob":
        blob = cls(data)
        blob.origin = origin
        return blob


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named by paths, directories (their data files, sorted) or globs, in a stable order.

    A directory holding .tar files is read as WebDataset shards only: img2dataset writes a
    ``*_stats.json`` next to every shard, which is not data.
    """
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(item, "*"))
                           if p.endswith((".jsonl", ".json", ".tar")))
            if any(p.endswith(".tar") for p in found):
                found = [p for p in found if p.endswith(".tar")]
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
        else:
            found = [item]
        if not found:
            raise FileNotFoundError(f"input {item!r} matches no files")
        for path in found:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"input file not found: {path}")
        files.extend(found)
    return files


def detect_format(path: str) -> str:
    """Guess the format of one input file from its extension and first record."""
    if path.endswith(".tar"):
        return "webdataset"
    with open(path, "r", encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith("["):
        with open(path, "r", encoding="utf-8") as f:
            first = (json.load(f) or [{}])[0]
    else:
        first = _first_json_line(path, head)
    if isinstance(first, dict) and "conversations" in first:
        return "llava"
    if isinstance(first, dict) and ("caption" in first or "text" in first):
        return "caption"
    raise ValueError(f"{path}: cannot detect the format (no 'conversations', 'caption' or 'text' key); "
                     f"pass --format")


def _first_json_line(path: str, head: str) -> dict:
    """The first line of a JSONL head that parses: a broken first line is a reject, not a reason
    to refuse the whole file."""
    lines = [ln for ln in head.splitlines() if ln.strip()]
    for line in lines[:100]:
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    if not lines:
        return {}
    raise ValueError(f"{path}: cannot detect the format, none of its first lines is JSON; pass --format")


def _iter_json_file(path: str, base_dir: str) -> Iterator[RawRecord]:
    """JSONL lines (unparsed) or the elements of a top-level JSON array."""
    with open(path, "r", encoding="utf-8") as f:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
    if first == "[":
        with open(path, "r", encoding="utf-8") as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON array ({e})") from e
        for i, item in enumerate(items):
            yield RawRecord(path, f"item {i}", item, base_dir)
        return
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield RawRecord(path, f"line {lineno}", line, base_dir)


def _iter_tar(path: str, base_dir: str) -> Iterator[RawRecord]:
    """Group a WebDataset tar's members by key (the name up to the first dot of the basename)."""
    current, members = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                dirname, base = os.path.split(info.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = os.path.join(dirname, stem)
                if key != current and current is not None:
                    yield RawRecord(path, current, members, base_dir)
                    members = {}
                current = key
                members[ext.lower()] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        if current is not None:
            yield RawRecord(path, current, members, base_dir, error=f"truncated_shard: {e}")
        else:
            yield RawRecord(path, "(start)", {}, base_dir, error=f"truncated_shard: {e}")
        return
    if current is not None:
        yield RawRecord(path, current, members, base_dir)


def iter_records(files: list[str], fmt: str, image_root: Optional[str]) -> Iterator[RawRecord]:
    """All raw records of all files, in order."""
    for path in files:
        base = image_root or os.path.dirname(os.path.abspath(path))
        if fmt == "webdataset":
            yield from _iter_tar(path, base)
        else:
            yield from _iter_json_file(path, base)


def _read_image(rel: str, base_dir: str) -> "ImageBlob":
    """Bytes of an image file; a missing file is a 'missing_image' reject."""
    if not isinstance(rel, str) or not rel:
        raise SampleError("bad_sample", f"image path {rel!r}")
    path = rel if os.path.isabs(rel) else os.path.join(base_dir, rel)
    try:
        with open(path, "rb") as f:
            return ImageBlob.make(f.read(), ("file", path))
    except FileNotFoundError as e:
        raise SampleError("missing_image", path) from e
    except OSError as e:
        raise SampleError("missing_image", f"{path}: {e}") from e


def _parse_json(payload: object) -> dict:
    """A dict from a JSONL line or an already-parsed element."""
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as e:
            raise SampleError("invalid_json", str(e)) from e
    if not isinstance(payload, dict):
        raise SampleError("invalid_json", f"expected an object, got {type(payload).__name__}")
    return payload


def caption_turns(caption: object, index: int, cfg: TemplateConfig, seed: int) -> list[dict]:
    """One user/assistant exchange for a caption; the prompt is picked by a seeded hash."""
    if not isinstance(caption, str) or not caption.strip():
        raise SampleError("bad_sample", "no caption text")
    prompts = cfg.caption_prompts
    prompt = prompts[zlib.crc32(f"{seed}:{index}".encode()) % len(prompts)]
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption.strip()}]


def to_conversation(rec: RawRecord, fmt: str, index: int, cfg: TemplateConfig,
                    seed: int) -> tuple[list[dict], list[bytes]]:
    """Parse one raw record into (LLaVA turns, image bytes in placeholder order)."""
    if rec.error:
        reason, _, detail = rec.error.partition(": ")
        raise SampleError(reason, detail)
    if fmt == "webdataset":
        m = rec.payload
        ext = next((e for e in IMAGE_EXTS if e in m), None)
        if ext is None:
            raise SampleError("missing_image", "no image member in the tar sample")
        if "txt" in m:
            text = m["txt"].decode("utf-8", errors="replace")
        elif "json" in m:
            meta = _parse_json(m["json"].decode("utf-8", errors="replace"))
            text = meta.get("caption", meta.get("text"))
        else:
            raise SampleError("bad_sample", "no .txt or .json caption member")
        return caption_turns(text, index, cfg, seed), [ImageBlob.make(m[ext], ("member", ext))]
    obj = _parse_json(rec.payload)
    image = obj.get("image")
    paths = [] if image is None else ([image] if isinstance(image, str) else image)
    if not isinstance(paths, list):
        raise SampleError("bad_sample", f"'image' is {type(image).__name__}")
    if fmt == "caption":
        turns = caption_turns(obj.get("caption", obj.get("text")), index, cfg, seed)
    else:
        turns = obj.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise SampleError("bad_sample", "no 'conversations' list")
    return turns, [_read_image(p, rec.base_dir) for p in paths]


def reread_image(origin: tuple[str, str], rec: RawRecord) -> bytes:
    """The bytes of an image a worker left behind (see ImageBlob)."""
    kind, value = origin
    if kind == "member":
        return rec.payload[value]
    with open(value, "rb") as f:
        return f.read()
