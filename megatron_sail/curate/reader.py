"""Read stage: inputs -> shards (the unit of work) -> samples (image bytes + original text).

Inputs are img2dataset WebDataset shards (one shard per tar), caption / LLaVA JSONL files (cut
into shards of ``samples_per_shard`` records) or an image folder (sorted files, cut the same
way; a ``NAME.txt`` next to ``NAME.jpg`` is its original text). The readers and the path checks
of data/preprocess/formats.py are reused: images are read inside the image root only and size-capped.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Optional

from megatron_sail.data.preprocess import formats
from megatron_sail.data.preprocess.formats import IMAGE_EXTS, ImageAccess
from megatron_sail.data.preprocess.media_refs import image_field
from megatron_sail.data.template import SampleError


@dataclass
class ReaderConfig:
    """Which inputs are read and how they are cut into shards."""

    inputs: list[str] = field(default_factory=list)
    """Tar shards, JSONL files, globs of either, or one image folder."""
    image_root: Optional[str] = None
    """Root relative image paths of JSONL records resolve against (default: the file's folder)."""
    samples_per_shard: int = 1000
    """Records per shard for JSONL files and image folders (a tar is one shard)."""
    max_image_bytes: int = formats.DEFAULT_MAX_IMAGE_BYTES
    """Largest image read; larger ones are ``file_too_large`` rejects."""
    max_sample_bytes: Optional[int] = None
    """Largest sum of one tar sample's members (None: twice max_image_bytes); larger: ``sample_too_large``."""


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: a whole tar, or a range of a JSONL file's records / a folder's images."""

    name: str
    """Output shard name (``NAME.tar``), unique within a run."""
    source: str
    """The input file or folder."""
    kind: str
    """'webdataset', 'jsonl' or 'folder'."""
    start: int = 0
    """First record (JSONL line with content, or image) of the range."""
    stop: Optional[int] = None
    """One past the last record; None: to the end."""


@dataclass
class Sample:
    """One image to caption, with what the input said about it."""

    key: str
    """WebDataset key of the output sample (no dots, unique in the shard)."""
    where: str
    """Where it came from (file and line / tar key), for rejects and provenance."""
    image: Optional[bytes] = None
    """Encoded image bytes as read (written out unchanged)."""
    ext: str = "jpg"
    """Image extension (the format of ``image``)."""
    original_text: Optional[str] = None
    """The input's caption text (kept beside the new one)."""
    original: dict = field(default_factory=dict)
    """Other input fields (a tar sample's json, a JSONL record without its image)."""
    error: Optional[SampleError] = None
    """Set when the sample could not be read (it becomes a reject)."""


def safe_key(text: str) -> str:
    """A WebDataset key: the reader splits a member name at its first dot, so no dots/slashes
    (and so no ``../`` or absolute path ever reaches an output member name). Recaption and
    filter_data both name their output members with it."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _stem(path: str) -> str:
    base = os.path.basename(path.rstrip("/"))
    return safe_key(base[:-4] if base.endswith(".tar") else os.path.splitext(base)[0])


def _folder_images(folder: str) -> list[str]:
    """Image files of a folder tree, relative, sorted (a stable order for reruns)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                out.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(out)


def _count_lines(path: str) -> int:
    """Records of a JSONL file (non-blank lines), or of a JSON array."""
    with open(path, "rb") as f:
        head = f.read(1 << 12).lstrip()
    if head.startswith(b"["):
        return sum(1 for _ in formats._iter_json_file(path, os.path.dirname(path), ImageAccess()))
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def list_shards(cfg: ReaderConfig) -> list[ShardSpec]:
    """Every shard of the inputs, in a stable order; duplicate shard names are an error."""
    if cfg.samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {cfg.samples_per_shard}")
    specs: list[ShardSpec] = []
    for item in cfg.inputs:
        if os.path.isdir(item) and not any(p.endswith((".tar", ".jsonl", ".json")) for p in os.listdir(item)):
            n = len(_folder_images(item))
            specs += _ranges(item, "folder", n, cfg.samples_per_shard)
            continue
        for path in formats.expand_inputs([item]):
            if path.endswith(".tar"):
                specs.append(ShardSpec(_stem(path), path, "webdataset"))
            elif path.endswith((".jsonl", ".json")):
                specs += _ranges(path, "jsonl", _count_lines(path), cfg.samples_per_shard)
            else:
                raise ValueError(f"input {path}: not a .tar, .jsonl or .json file nor an image folder")
    seen: dict[str, str] = {}
    for s in specs:
        if s.name in seen and seen[s.name] != s.source:
            raise ValueError(
                f"inputs {seen[s.name]} and {s.source} both give output shard {s.name}.tar; "
                "rename one or recaption them into different --output-dir"
            )
        seen[s.name] = s.source
    return specs


def _ranges(source: str, kind: str, n: int, per: int) -> list[ShardSpec]:
    """Shards of ``per`` records; a single shard keeps the plain stem as its name."""
    stem = _stem(source)
    if n <= per:
        return [ShardSpec(stem, source, kind, 0, None)]
    return [
        ShardSpec(f"{stem}-{k:05d}", source, kind, start, min(start + per, n))
        for k, start in enumerate(range(0, n, per))
    ]


def shard_size(spec: ShardSpec, cfg: ReaderConfig) -> Optional[int]:
    """Samples in a shard (for the progress bar): the range, or a tar's distinct keys."""
    if spec.kind != "webdataset":
        if spec.stop is not None:
            return spec.stop - spec.start
        return len(_folder_images(spec.source)) if spec.kind == "folder" else _count_lines(spec.source)
    try:
        with tarfile.open(spec.source, "r:") as tar:  # headers only: data is seeked over
            return len(
                {
                    os.path.join(os.path.dirname(m.name), os.path.basename(m.name).split(".", 1)[0])
                    for m in tar.getmembers()
                    if m.isfile() and "." in os.path.basename(m.name)
                }
            )
    except (tarfile.TarError, OSError, EOFError):
        return None


class ReadStage:
    """Yields the samples of one shard in input order; unreadable ones carry their error."""

    def __init__(self, cfg: ReaderConfig):
        self.cfg = cfg
        self.access = ImageAccess(max_bytes=cfg.max_image_bytes, max_sample_bytes=cfg.max_sample_bytes)

    def read(self, spec: ShardSpec) -> Iterator[Sample]:
        """The shard's samples."""
        if spec.kind == "webdataset":
            yield from self._tar(spec)
        elif spec.kind == "jsonl":
            yield from self._jsonl(spec)
        else:
            yield from self._folder(spec)

    def _tar(self, spec: ShardSpec) -> Iterator[Sample]:
        base = os.path.dirname(os.path.abspath(spec.source))
        for rec in formats._iter_tar(spec.source, base, self.access):
            where = f"{spec.source}:{rec.key}"
            s = Sample(safe_key(rec.key), where)
            try:
                if rec.error:
                    reason, _, detail = rec.error.partition(": ")
                    raise SampleError(reason, detail)
                m = rec.payload
                ext = next((e for e in IMAGE_EXTS if e in m), None)
                if ext is None:
                    raise SampleError("missing_image", "no image member in the tar sample")
                s.image, s.ext = m[ext], ext
                if "json" in m:
                    s.original = formats._parse_json(formats._utf8(m["json"], f"{rec.key}.json"))
                if "txt" in m:
                    s.original_text = formats._utf8(m["txt"], f"{rec.key}.txt")
                elif isinstance(s.original.get("caption"), str):
                    s.original_text = s.original["caption"]
            except SampleError as e:
                s.error = e
            yield s

    def _jsonl(self, spec: ShardSpec) -> Iterator[Sample]:
        base = self.cfg.image_root or os.path.dirname(os.path.abspath(spec.source))
        stem = _stem(spec.source)
        records = formats._iter_json_file(spec.source, base, self.access)
        for i, rec in enumerate(records):
            if i < spec.start:
                continue
            if spec.stop is not None and i >= spec.stop:
                break
            s = Sample(f"{stem}-{i:09d}", f"{spec.source}:{rec.key}")
            try:
                obj = formats._parse_json(rec.payload)
                refs = image_field(obj)
                if len(refs) != 1:
                    raise SampleError("bad_sample", f"{len(refs)} images in the record (one is captioned)")
                data = formats._load_image(refs[0], base, self.access)
                s.image, s.ext = bytes(data), _ext_of(refs[0], data)
                s.original_text = _record_text(obj)
                s.original = {k: v for k, v in obj.items() if k not in ("image", "images")}
                s.original["image"] = (
                    refs[0] if isinstance(refs[0], str) and not refs[0].startswith("data:") else None
                )
            except SampleError as e:
                s.error = e
            yield s

    def _folder(self, spec: ShardSpec) -> Iterator[Sample]:
        names = _folder_images(spec.source)[spec.start : spec.stop]
        for k, rel in enumerate(names, spec.start):
            s = Sample(f"{k:09d}", f"{spec.source}/{rel}")
            try:
                data = formats._read_image(rel, spec.source, self.access)
                s.image, s.ext = bytes(data), rel.rsplit(".", 1)[-1].lower()
                sidecar = os.path.join(spec.source, os.path.splitext(rel)[0] + ".txt")
                if os.path.isfile(sidecar):
                    s.original_text = formats._utf8(
                        formats.read_regular_file(sidecar, self.access.max_bytes), sidecar
                    )
                s.original = {"path": rel}
            except SampleError as e:
                s.error = e
            yield s


def _record_text(obj: dict) -> Optional[str]:
    """A caption record's text, or a LLaVA record's answers joined."""
    text = obj.get("caption", obj.get("text"))
    if isinstance(text, str):
        return text
    turns = obj.get("conversations")
    if isinstance(turns, list):
        answers = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
        return "\n".join(a for a in answers if isinstance(a, str)) or None
    return None


def _ext_of(ref, data: bytes) -> str:
    """The image's extension from its name, else sniffed from its bytes."""
    if isinstance(ref, str) and not ref.startswith("data:") and "." in os.path.basename(ref):
        ext = ref.rsplit(".", 1)[-1].lower()
        if ext in IMAGE_EXTS:
            return ext
    head = data[:12]
    if head.startswith(b"\x89PNG"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:3] == b"GIF":
        return "gif"
    return "jpg"


def dump_json(obj) -> bytes:
    """Compact UTF-8 JSON (lone surrogates from bad input escaped rather than crashing)."""
    return json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8", "backslashreplace")
