"""The filter list: which stages run, in which order, with which thresholds, and one sample
through them. filters/job.py runs it per shard (sharded, resumable); dedup/ computes the
keep-lists the ``dedup`` entry applies; filters/pipeline.py runs the whole job in one call.

filters.yaml is either an ordered list (the order is the run order)::

    filters:
      - image: {min_side: 32}
      - caption_length: {min_words: 3}
      - exact_dedup: {}
      - near_dedup: {max_distance: 4}
      - judge: {backend: hf, model: ckpt/judge, min_vir: 3}

or, as before, a mapping of sections run in the canonical order of ``STAGES``. The dedup
entries (exact_dedup, near_dedup, semantic_dedup) are grouping settings; the duplicates they
find are removed at the position of the first of them. Everything is deterministic (no
sampling, fixed order), so two runs and any worker count give the same bytes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import yaml

from megatron_sail.curate.filters.base import FilterSample, FilterStage, Reject
from megatron_sail.curate.filters.caption_check import (
    CaptionLength,
    CaptionLengthConfig,
    Language,
    LanguageConfig,
    Refusal,
    RefusalConfig,
    Repetition,
    RepetitionConfig,
)
from megatron_sail.curate.filters.clip_score import ClipScore, ClipScoreConfig
from megatron_sail.curate.filters.dedup import (
    DedupApply,
    ExactDedupConfig,
    NearDedupConfig,
    SemanticDedupConfig,
)
from megatron_sail.curate.filters.image_check import ImageCheck, ImageCheckConfig
from megatron_sail.curate.filters.judge import Judge, JudgeConfig
from megatron_sail.curate.reader import safe_key
from megatron_sail.data.images.imageinfo import clean_message
from megatron_sail.data.preprocess import formats
from megatron_sail.data.preprocess.formats import IMAGE_EXTS, ImageAccess

CAPTION_KEYS = ("txt", "caption", "caption.txt")
"""Members holding the caption, first found wins (recaption output: ``txt``; its
``original.txt`` is the input's text and is kept, not judged)."""
DEDUP_SECTIONS = ("exact_dedup", "near_dedup", "semantic_dedup")
STAGES = [
    ("image", ImageCheck, ImageCheckConfig),
    ("caption_length", CaptionLength, CaptionLengthConfig),
    ("repetition", Repetition, RepetitionConfig),
    ("refusal", Refusal, RefusalConfig),
    ("language", Language, LanguageConfig),
    ("exact_dedup", None, ExactDedupConfig),
    ("near_dedup", None, NearDedupConfig),
    ("semantic_dedup", None, SemanticDedupConfig),
    ("clip", ClipScore, ClipScoreConfig),
    ("judge", Judge, JudgeConfig),
]
"""(config section, stage class, config class) in the canonical order (dedup sections: no
stage of their own, see DedupApply)."""


@dataclass
class FilterConfig:
    """Every stage's config, by section name (the keys of filters.yaml), and the run order."""

    image: ImageCheckConfig = field(default_factory=ImageCheckConfig)
    """Decodable, min side, aspect ratio."""
    caption_length: CaptionLengthConfig = field(default_factory=CaptionLengthConfig)
    """Caption length in words."""
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    """n-gram repetition (looping captioner)."""
    refusal: RefusalConfig = field(default_factory=RefusalConfig)
    """Refusals and boilerplate."""
    language: LanguageConfig = field(default_factory=LanguageConfig)
    """Caption language."""
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    """Byte-identical images (global, through the dedup passes)."""
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    """Perceptual-hash near-duplicates (global, through the dedup passes)."""
    semantic_dedup: SemanticDedupConfig = field(default_factory=SemanticDedupConfig)
    """CLIP-embedding semantic duplicates (global, optional)."""
    clip: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    """Optional CLIP image-text similarity."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Optional VLM judge of caption quality (SAIL-Caption2's VIR and ITA)."""
    order: list[str] = field(default_factory=lambda: [s for s, _, _ in STAGES])
    """Run order of the sections (an ordered filters.yaml sets it)."""

    def dedup_enabled(self) -> bool:
        return any(getattr(self, s).enabled for s in DEDUP_SECTIONS)


def _set_section(cfg: FilterConfig, section: str, values, path: str) -> None:
    if section not in {s for s, _, _ in STAGES}:
        raise ValueError(f"{path}: unknown filter section {section!r} (known: {[s for s, _, _ in STAGES]})")
    sub = getattr(cfg, section)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: section {section!r} must be a mapping")
    known = {f.name for f in dataclasses.fields(sub)}
    for k, v in values.items():
        if k not in known:
            raise ValueError(f"{path}: unknown field {section}.{k} (known: {sorted(known)})")
        setattr(sub, k, v)


def load_config(path: Optional[str]) -> FilterConfig:
    """filters.yaml -> FilterConfig; unknown sections or fields are an error naming them. In the
    list form, sections not listed are disabled and the list order is the run order."""
    cfg = FilterConfig()
    if path is None:
        return cfg
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if isinstance(raw, dict) and list(raw) == ["filters"] and isinstance(raw["filters"], list):
        order = []
        for entry in raw["filters"]:
            if isinstance(entry, str):
                entry = {entry: {}}
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ValueError(
                    f"{path}: each filters entry is one section name or {{name: {{fields}}}}, got {entry!r}"
                )
            [(section, values)] = entry.items()
            if section in order:
                raise ValueError(f"{path}: filter {section!r} is listed twice")
            _set_section(cfg, section, values, path)
            getattr(cfg, section).enabled = (values or {}).get("enabled", True)
            order.append(section)
        for section, _, _ in STAGES:
            if section not in order:
                getattr(cfg, section).enabled = False
        cfg.order = order + [s for s, _, _ in STAGES if s not in order]
        return cfg
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path}: expected a mapping of filter sections or a 'filters:' list, got {type(raw).__name__}"
        )
    for section, values in raw.items():
        _set_section(cfg, section, values, path)
    return cfg


def build_stages(
    cfg: FilterConfig, keep_dir: Optional[str] = None, upto_dedup: bool = False
) -> list[FilterStage]:
    """The enabled stages in run order; the dedup entries become one DedupApply at the first of
    them (needs ``keep_dir``). ``upto_dedup``: only the stages before it (the signature pass)."""
    stages: list[FilterStage] = []
    classes = {s: c for s, c, _ in STAGES}
    dedup_placed = False
    for section in cfg.order:
        if not getattr(cfg, section).enabled:
            continue
        if section in DEDUP_SECTIONS:
            if dedup_placed:
                continue
            dedup_placed = True
            if upto_dedup:
                return stages
            if keep_dir is None:
                raise ValueError(
                    "deduplication is enabled but no keep-lists were given (--keep-lists DIR from "
                    "tools/dedup.py group), or disable exact_dedup/near_dedup/semantic_dedup"
                )
            stages.append(DedupApply(keep_dir))
            continue
        stages.append(classes[section](getattr(cfg, section)))
    return stages


def run_stages(stages: list[FilterStage], sample: FilterSample) -> tuple[str, Optional[Reject], dict]:
    """(stage name, reject or None, seconds per stage) for one sample through the stages."""
    import time

    seconds: dict[str, float] = {}
    for st in stages:
        t0 = time.perf_counter()
        reject = st.process(sample)
        seconds[st.name] = time.perf_counter() - t0
        if reject is not None:
            return st.name, reject, seconds
    return "", None, seconds


def read_shard(
    path: str, max_bytes: int, max_sample_bytes: Optional[int] = None
) -> Iterator[tuple[FilterSample, Optional[Reject]]]:
    """Samples of one tar in order (members grouped by key), each with a read error if any.

    Keys are sanitized exactly as recaption sanitizes them (reader.safe_key: no ``../``, no
    absolute path, no dots), so an output member name is always safe to extract; a key seen
    before in the shard (after sanitizing) is a ``duplicate_key`` reject, never a second kept
    sample that the next reader would merge with the first."""
    name = shard_name(path)
    seen: set[str] = set()
    access = ImageAccess(max_bytes=max_bytes, max_sample_bytes=max_sample_bytes)
    for rec in formats._iter_tar(path, os.path.dirname(path), access):
        members = rec.payload
        sample = FilterSample(key=safe_key(rec.key), shard=name, members=members)
        sample.image_ext = next((e for e in members if e in IMAGE_EXTS), None)
        if sample.key in seen:
            yield (
                sample,
                Reject("duplicate_key", f"key {rec.key!r} appears twice in the shard (as {sample.key})"),
            )
            continue
        seen.add(sample.key)
        if rec.error:
            reason, _, detail = rec.error.partition(": ")
            yield sample, Reject(reason, clean_message(detail))
            continue
        cap = next((members[k] for k in CAPTION_KEYS if k in members), None)
        if cap is not None:
            try:
                sample.caption = cap.decode("utf-8")
            except UnicodeDecodeError as e:
                yield sample, Reject("bad_encoding", f"caption is not UTF-8 ({e.reason} at byte {e.start})")
                continue
        yield sample, None


def shard_name(path: str) -> str:
    base = os.path.basename(path)
    return base[:-4] if base.endswith(".tar") else base
