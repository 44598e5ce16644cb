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
import stat
import tarfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Mapping, Optional, Union

from megatron_sail.config.data import DEFAULT_MAX_IMAGE_BYTES, TemplateConfig
from megatron_sail.data.preprocess.formats_messages import messages_conversation
from megatron_sail.data.preprocess.media_refs import (
    check_unsupported_media,
    image_field,
    inline_image,
    local_path,
    plain_ref,
)
from megatron_sail.data.preprocess.video import VideoClip
from megatron_sail.data.template import SampleError

FORMATS = ("llava", "caption", "webdataset", "messages")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass(frozen=True)
class ImageAccess:
    """Which image files a record may read (PreprocessConfig.allow_absolute_paths, max_image_bytes)."""

    allow_absolute: bool = False
    """Read absolute paths as given; off: they are ``path_outside_root`` rejects."""
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    """Largest file or tar member read; larger ones are ``file_too_large`` rejects."""
    max_sample_bytes: Optional[int] = None
    """Largest sum of one tar sample's members (None: twice ``max_bytes``); a larger sample is a
    ``sample_too_large`` reject and its members are dropped as soon as the sum passes it, so six
    100 MiB members under the per-member cap never sit in memory together."""

    @property
    def sample_cap(self) -> int:
        return self.max_sample_bytes if self.max_sample_bytes is not None else 2 * self.max_bytes


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
    access: ImageAccess = ImageAccess()
    """What image files the record may read (paths stay inside base_dir unless allowed)."""


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


def named_files(path: str, suffix: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Files one path names, sorted: a folder's ``*suffix`` files (minus names ending in one of
    ``exclude``), a glob's matches, or the file itself; [] when it names none (the caller's error
    says what was expected)."""
    if os.path.isdir(path):
        found = glob.glob(os.path.join(path, "*" + suffix))
        return sorted(f for f in found if not f.endswith(exclude)) if exclude else sorted(found)
    if any(c in path for c in "*?["):
        return sorted(glob.glob(path))
    return [path] if os.path.isfile(path) else []


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named by paths, directories (their data files, sorted) or globs, in a stable order.

    A directory holding .tar files is read as WebDataset shards only: img2dataset writes a
    ``*_stats.json`` next to every shard, which is not data.
    """
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                p for p in glob.glob(os.path.join(item, "*")) if p.endswith((".jsonl", ".json", ".tar"))
            )
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
                if os.path.exists(path):  # a FIFO or device would hang or never end
                    raise ValueError(f"input {path} is not a regular file")
                raise FileNotFoundError(f"input file not found: {path}")
        files.extend(found)
    return files


def detect_format(path: str) -> str:
    """Guess the format of one input file from its extension and first record."""
    if path.endswith(".tar"):
        return "webdataset"
    with open(path, "rb") as f:  # undecodable bytes are a reject of their line, not of the file
        head = f.read(1 << 16).decode("utf-8", errors="replace").lstrip()
    if head.startswith("["):
        with open(path, "r", encoding="utf-8", errors="surrogateescape") as f:
            first = (json.load(f) or [{}])[0]
    else:
        first = _first_json_line(path, head)
    if isinstance(first, dict) and "messages" in first:
        return "messages"  # OpenAI chat, Hugging Face content parts, ms-swift (formats_messages.py)
    if isinstance(first, dict) and "conversations" in first:
        return "llava"
    if isinstance(first, dict) and ("caption" in first or "text" in first):
        return "caption"
    raise ValueError(
        f"{path}: cannot detect the format (no 'messages', 'conversations', 'caption' or "
        f"'text' key in the first record); pass --format (one of {', '.join(FORMATS)})"
    )


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


def _iter_json_file(path: str, base_dir: str, access: ImageAccess) -> Iterator[RawRecord]:
    """JSONL lines (unparsed bytes, decoded by the worker) or the elements of a JSON array.

    An array file is parsed whole, with invalid UTF-8 kept as lone surrogates
    (surrogateescape), so one bad byte rejects only the item holding it (``bad_encoding``).
    """
    with open(path, "rb") as f:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
    if first == b"[":
        with open(path, "r", encoding="utf-8", errors="surrogateescape") as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON array ({e})") from e
        for i, item in enumerate(items):
            yield RawRecord(path, f"item {i}", item, base_dir, access=access)
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield RawRecord(path, f"line {lineno}", line, base_dir, access=access)


def _iter_tar(path: str, base_dir: str, access: ImageAccess) -> Iterator[RawRecord]:
    """Group a WebDataset tar's members by key (the name up to the first dot of the basename).

    A member larger than ``access.max_bytes`` is not read; its sample is a ``file_too_large``
    reject. A sample whose members add up to more than ``access.sample_cap`` is a
    ``sample_too_large`` reject, and a member name repeated inside one sample (``k.jpg`` twice,
    or ``k.jpg`` and ``k.JPG``) a ``duplicate_member`` reject: the second never silently
    replaces the first. The first error of a sample wins.
    """
    current, members, error, total = None, {}, None, 0
    cap = access.sample_cap
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
                    yield RawRecord(path, current, members, base_dir, error, access)
                    members, error, total = {}, None, 0
                current = key
                if error is not None:
                    continue  # already a reject: read nothing more of it
                if info.size > access.max_bytes:
                    error = (
                        f"file_too_large: member {info.name} is {info.size} bytes > "
                        f"--max-image-bytes {access.max_bytes}"
                    )
                elif ext.lower() in members:
                    error = f"duplicate_member: member {info.name} appears twice in sample {key}"
                elif total + info.size > cap:
                    error = (
                        f"sample_too_large: sample {key} has more than {cap} bytes of members "
                        f"(at {info.name})"
                    )
                else:
                    total += info.size
                    members[ext.lower()] = tar.extractfile(info).read()
                    continue
                members, total = {}, 0  # a reject keeps no member bytes
    except (tarfile.TarError, OSError, EOFError) as e:
        if current is not None:
            yield RawRecord(path, current, members, base_dir, f"truncated_shard: {e}", access)
        else:
            yield RawRecord(path, "(start)", {}, base_dir, f"truncated_shard: {e}", access)
        return
    if current is not None:
        yield RawRecord(path, current, members, base_dir, error, access)


FileFormats = Union[str, Mapping[str, str]]
"""One format for every input file, or each file's own (a glob may mix formats)."""


def format_of(fmt: FileFormats, path: str) -> str:
    """The format of ``path`` under ``fmt``."""
    return fmt if isinstance(fmt, str) else fmt[path]


def detect_formats(files: list[str], forced: Optional[str] = None) -> dict[str, str]:
    """Each file's format: ``forced`` (--format) for all, else detected per file, so a glob over
    LLaVA and caption files reads each as what it is."""
    return {path: forced or detect_format(path) for path in files}


def describe_formats(formats: Mapping[str, str], shown: int = 3) -> list[str]:
    """One line per format: how many files, and the first few of them (the run log)."""
    by_format: dict[str, list[str]] = {}
    for path, fmt in formats.items():
        by_format.setdefault(fmt, []).append(path)
    return [
        f"format {fmt}: {len(paths)} file(s): {', '.join(paths[:shown])}"
        + (f", ... ({len(paths) - shown} more)" if len(paths) > shown else "")
        for fmt, paths in sorted(by_format.items())
    ]


def iter_records(
    files: list[str], fmt: FileFormats, image_root: Optional[str], access: ImageAccess = ImageAccess()
) -> Iterator[RawRecord]:
    """All raw records of all files, in order (``fmt``: one format or each file's)."""
    for path in files:
        base = image_root or os.path.dirname(os.path.abspath(path))
        if format_of(fmt, path) == "webdataset":
            yield from _iter_tar(path, base, access)
        else:
            yield from _iter_json_file(path, base, access)


@lru_cache(maxsize=256)
def _real_root(base_dir: str) -> str:
    """The image root with every symlink resolved (what resolved image paths must start with)."""
    return os.path.realpath(base_dir)


@lru_cache(maxsize=4096)
def _real_dir(path: str) -> str:
    """A directory's real path, cached: images share few directories, and resolving every
    component of every image path (os.path.realpath) tripled the cost of reading a file."""
    return os.path.realpath(path)


def resolve_image_path(rel: str, base_dir: str, access: ImageAccess) -> str:
    """The real path of an image, refused (``path_outside_root``) when it leaves the root.

    ``..`` components and symlinks are resolved first, so neither can reach outside the root;
    absolute paths are read as given only with ``access.allow_absolute``.
    """
    if "\0" in rel:
        raise SampleError("bad_sample", f"image path {rel!r} holds a NUL byte")
    try:
        if os.path.isabs(rel):
            if not access.allow_absolute:
                raise SampleError(
                    "path_outside_root",
                    f"{rel}: absolute image paths are refused (--allow-absolute-paths reads them)",
                )
            return rel
        root = _real_root(base_dir)
        head, tail = os.path.split(os.path.join(root, rel))
        if tail in ("", ".", ".."):
            real = os.path.realpath(os.path.join(root, rel))
        else:  # the directory from the cache, then the file itself, if it is a symlink
            real = os.path.join(_real_dir(head), tail)
            if os.path.islink(real):
                real = os.path.realpath(real)
    except UnicodeError as e:  # a lone surrogate cannot name a file
        raise SampleError("bad_encoding", f"image path {rel!r} is not valid Unicode") from e
    except ValueError as e:  # an embedded NUL byte
        raise SampleError("bad_sample", f"image path {rel!r}: {e}") from e
    if os.path.commonpath([root, real]) != root:
        raise SampleError("path_outside_root", f"{rel} resolves to {real}, outside the image root {root}")
    return real


_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def _check_regular(path: str, mode: int) -> None:
    """Refuse anything but a regular file: a FIFO would block forever, /dev/zero never ends."""
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "special file")
        raise SampleError("not_a_regular_file", f"{path} is a {kind}")


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else is a reject."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even on a FIFO
    except FileNotFoundError as e:
        raise SampleError("missing_image", path) from e
    except OSError as e:  # e.g. a socket (ENXIO): say what it is when it is not a file
        try:
            _check_regular(path, os.stat(path).st_mode)
        except OSError:
            pass
        raise SampleError("missing_image", f"{path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        _check_regular(path, st.st_mode)  # before fdopen, which refuses a directory itself
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        if st.st_size > max_bytes:
            raise SampleError("file_too_large", f"{path}: {st.st_size} bytes > --max-image-bytes {max_bytes}")
        # ask for the size fstat gave (+1 shows growth): read(max_bytes + 1) would allocate a
        # --max-image-bytes buffer (128 MiB) per image, ~6x the cost of reading a 165 KB JPEG
        data = f.read(min(st.st_size, max_bytes) + 1)
        if len(data) > st.st_size:  # grew since fstat: read on, up to the cap
            data += f.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise SampleError("file_too_large", f"{path}: more than --max-image-bytes {max_bytes} bytes")
    return data


def _read_image(rel: str, base_dir: str, access: ImageAccess = ImageAccess()) -> "ImageBlob":
    """Bytes of an image file inside the root; a missing file is a 'missing_image' reject."""
    if not isinstance(rel, str) or not rel:
        raise SampleError("bad_sample", f"image path {rel!r}")
    try:
        path = resolve_image_path(rel, base_dir, access)
        return ImageBlob.make(read_regular_file(path, access.max_bytes), ("file", path))
    except UnicodeError as e:  # a lone surrogate cannot name a file
        raise SampleError("bad_encoding", f"image path {rel!r} is not valid Unicode") from e


def _utf8(data: bytes, what: str) -> str:
    """Strictly decoded text; invalid UTF-8 is a ``bad_encoding`` reject naming the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError(
            "bad_encoding", f"invalid UTF-8 byte 0x{data[e.start]:02x} at byte {e.start} of {what}"
        ) from e


def _parse_json(payload: object) -> dict:
    """A dict from a JSONL line (bytes or str) or an already-parsed element."""
    if isinstance(payload, bytes):
        payload = _utf8(payload, "the line")
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


def to_conversation(
    rec: RawRecord, fmt: FileFormats, index: int, cfg: TemplateConfig, seed: int
) -> tuple[list[dict], list[bytes]]:
    """Parse one raw record into (LLaVA turns, image bytes in placeholder order)."""
    fmt = format_of(fmt, rec.source)
    if rec.error:
        reason, _, detail = rec.error.partition(": ")
        raise SampleError(reason, detail)
    if fmt == "webdataset":
        m = rec.payload
        ext = next((e for e in IMAGE_EXTS if e in m), None)
        if ext is None:
            raise SampleError("missing_image", "no image member in the tar sample")
        if "txt" in m:
            text = _utf8(m["txt"], f"{rec.key}.txt")
        elif "json" in m:
            meta = _parse_json(_utf8(m["json"], f"{rec.key}.json"))
            text = meta.get("caption", meta.get("text"))
        else:
            raise SampleError("bad_sample", "no .txt or .json caption member")
        return caption_turns(text, index, cfg, seed), [ImageBlob.make(m[ext], ("member", ext))]
    obj = _parse_json(rec.payload)
    if fmt == "messages":
        turns, paths, videos = messages_conversation(obj, cfg.image_separator)
        return turns, (
            [_load_image(p, rec.base_dir, rec.access) for p in paths] + [_load_video(v, rec) for v in videos]
        )
    if fmt == "caption":
        check_unsupported_media(obj, [])
        paths = image_field(obj)
        turns = caption_turns(obj.get("caption", obj.get("text")), index, cfg, seed)
    else:
        turns = obj.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise SampleError("bad_sample", "no 'conversations' list")
        video = obj.get("video") if isinstance(obj.get("video"), str) and obj.get("video") else None
        if obj.get("videos"):
            raise SampleError(
                "video_unsupported", "'videos' list in a LLaVA/InternVL record (one 'video' is read)"
            )
        check_unsupported_media(
            obj,
            [t.get("value", t.get("content")) for t in turns if isinstance(t, dict)],
            video_ok=video is not None,
        )
        paths = image_field(obj)
        if video is not None:  # InternVL video sample: frames are taken later (video.py)
            return turns, (
                [_load_image(p, rec.base_dir, rec.access) for p in paths] + [_load_video(video, rec)]
            )
    return turns, [_load_image(p, rec.base_dir, rec.access) for p in paths]


def _load_video(ref: object, rec: RawRecord) -> VideoClip:
    """A clip's bytes, read like an image file (inside the root, size-capped); no inline clips."""
    if not isinstance(ref, str) or inline_image(ref, rec.access.max_bytes) is not None:
        raise SampleError("bad_sample", f"video reference {str(ref)[:80]!r} is not a file path")
    clip = _read_image(local_path(ref), rec.base_dir, rec.access)
    return VideoClip.make(bytes(clip), clip.origin[1])


def _load_image(ref: object, base_dir: str, access: ImageAccess = ImageAccess()) -> bytes:
    """A ``data:`` URI decoded, a remote URL rejected (media_refs.py), else a file under base_dir."""
    ref = plain_ref(ref)
    blob = inline_image(ref, access.max_bytes)
    return (
        blob
        if blob is not None
        else _read_image(local_path(ref) if isinstance(ref, str) else ref, base_dir, access)
    )


def reread_image(origin: tuple[str, str], rec: RawRecord) -> bytes:
    """The bytes of an image a worker left behind (see ImageBlob)."""
    kind, value = origin
    if kind == "member":
        return rec.payload[value]
    return read_regular_file(value, rec.access.max_bytes)
