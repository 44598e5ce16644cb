"""SFT samples for complexity scoring, read exactly as tools/preprocess_data.py reads them
(its readers: data/preprocess/formats.py), with the (source, key) that names each one in a sidecar."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

from megatron_sail.config.data import TemplateConfig
from megatron_sail.data.preprocess.formats import (
    ImageAccess,
    RawRecord,
    detect_formats,
    expand_inputs,
    iter_records,
    to_conversation,
)
from megatron_sail.data.template import SampleError


@dataclass
class Sample:
    """One parsed sample."""

    source: str
    """Absolute path of its input file (the sidecar key, with ``key``)."""
    key: str
    """Where it is in the file: 'line N', 'item N' or the WebDataset sample key."""
    turns: list
    """LLaVA-style turns [{'from': 'human'|'gpt'|'system', 'value': text}, ...]."""
    images: list = field(default_factory=list)
    """Encoded image bytes, in placeholder order."""


@dataclass
class Reject:
    """A record that could not be parsed (the scorer skips, counts and writes it)."""

    source: str
    key: str
    reason: str
    detail: str


@dataclass(frozen=True)
class InputConfig:
    """Which files to read and how (the preprocessing flags of the same names)."""

    inputs: tuple = ()
    """Files, directories or globs (tools/preprocess_data.py --input)."""
    format: Optional[str] = None
    """llava, caption, webdataset or messages for every file; None: detected per file (a glob
    may mix formats, as preprocessing allows)."""
    image_root: Optional[str] = None
    """Directory of relative image paths (default: each input file's directory)."""
    template: TemplateConfig = TemplateConfig()
    """Caption prompts and separators, as preprocessing uses them."""
    seed: int = 1234
    """Preprocessing's --seed (picks the caption prompt of caption pairs)."""


def input_files(cfg: InputConfig) -> tuple[list[str], dict[str, str]]:
    """(absolute file paths in order, {path: format}): each file read as what it is, so that the
    scores name the same samples preprocessing reads from a mixed glob."""
    files = [os.path.abspath(p) for p in expand_inputs(list(cfg.inputs))]
    return files, detect_formats(files, cfg.format)


def parse(rec: RawRecord, fmt: str, cfg: InputConfig, index: int) -> Union[Sample, Reject]:
    """One raw record as a Sample, or a Reject with preprocessing's reason. ``index``: the
    running record number preprocessing gives it (caption prompts are picked from it)."""
    try:
        turns, images = to_conversation(rec, fmt, index, cfg.template, cfg.seed)
    except SampleError as e:
        return Reject(rec.source, rec.key, e.reason, str(e.detail))
    except Exception as e:  # noqa: BLE001 - one hostile record must not stop a long run
        return Reject(rec.source, rec.key, "unexpected_error", f"{type(e).__name__}: {e}")
    return Sample(rec.source, rec.key, list(turns), [bytes(b) for b in images])


def iter_shards(path: str, fmt: str, cfg: InputConfig, per_shard: int) -> Iterator[tuple[int, list]]:
    """(shard number, [raw records]) of one file, ``per_shard`` records each. Records are not
    parsed here (no image is read), so skipping a finished shard costs only reading its lines."""
    records = iter_records([path], fmt, cfg.image_root, ImageAccess())
    for shard in itertools.count():
        chunk = list(itertools.islice(records, per_shard))
        if not chunk:
            return
        yield shard, chunk


def qa_pairs(turns: list) -> list[tuple[str, str]]:
    """(question, answer) per assistant turn: the user text before it (image placeholders
    dropped) and its reply."""
    pairs, question = [], ""
    for t in turns:
        role = t.get("from", t.get("role"))
        text = t.get("value", t.get("content")) or ""
        if role in ("human", "user"):
            question = text.replace("<image>", "").strip()
        elif role in ("gpt", "assistant"):
            pairs.append((question, text.strip()))
            question = ""
    return pairs
