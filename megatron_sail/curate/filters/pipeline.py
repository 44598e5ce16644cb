"""Run the filter stages over WebDataset shards: read in input order, keep or reject each
sample, write kept samples (members unchanged) to one output shard per input shard, rejects
with their reason, and a report (JSON + histogram PNG).

Stage order: image checks, caption checks, the optional CLIP score, then exact and near
deduplication. Quality checks come first so that the sample kept for a duplicate group is the
first *usable* one in input order; everything is deterministic (no sampling, fixed order).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import yaml

from megatron_sail.curate.filters.base import FilterSample, FilterStage, Reject
from megatron_sail.curate.filters.caption_check import (CaptionLength, CaptionLengthConfig, Language,
                                                        LanguageConfig, Refusal, RefusalConfig,
                                                        Repetition, RepetitionConfig)
from megatron_sail.curate.filters.clip_score import ClipScore, ClipScoreConfig
from megatron_sail.curate.filters.dedup import ExactDedup, ExactDedupConfig, NearDedup, NearDedupConfig
from megatron_sail.curate.filters.image_check import ImageCheck, ImageCheckConfig
from megatron_sail.data.preprocess import formats
from megatron_sail.data.preprocess.formats import IMAGE_EXTS, ImageAccess

CAPTION_KEYS = ("txt", "caption", "caption.txt")
"""Members holding the caption, first found wins (recaption output: ``txt``; its
``original.txt`` is the input's text and is kept, not judged)."""
REPORT_JSON, REPORT_PNG, REJECTS = "filter_report.json", "filter_report.png", "rejects.jsonl"

STAGES = [("image", ImageCheck, ImageCheckConfig), ("caption_length", CaptionLength, CaptionLengthConfig),
          ("repetition", Repetition, RepetitionConfig), ("refusal", Refusal, RefusalConfig),
          ("language", Language, LanguageConfig), ("clip", ClipScore, ClipScoreConfig),
          ("exact_dedup", ExactDedup, ExactDedupConfig), ("near_dedup", NearDedup, NearDedupConfig)]
"""(config section, stage class, config class) in run order."""


@dataclass
class FilterConfig:
    """Every stage's config, by section name (the keys of filters.yaml)."""

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
    clip: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    """Optional CLIP image-text similarity."""
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    """Byte-identical images."""
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    """Perceptual-hash near-duplicates."""


def load_config(path: Optional[str]) -> FilterConfig:
    """filters.yaml -> FilterConfig; unknown sections or fields are an error naming them."""
    cfg = FilterConfig()
    if path is None:
        return cfg
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of filter sections, got {type(raw).__name__}")
    for section, values in raw.items():
        if not hasattr(cfg, section):
            raise ValueError(f"{path}: unknown filter section {section!r} (known: {[s for s, _, _ in STAGES]})")
        sub = getattr(cfg, section)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping")
        known = {f.name for f in dataclasses.fields(sub)}
        for k, v in values.items():
            if k not in known:
                raise ValueError(f"{path}: unknown field {section}.{k} (known: {sorted(known)})")
            setattr(sub, k, v)
    return cfg


def build_stages(cfg: FilterConfig) -> list[FilterStage]:
    """The enabled stages, in run order."""
    return [cls(getattr(cfg, section)) for section, cls, _ in STAGES if getattr(cfg, section).enabled]


def read_shard(path: str, max_bytes: int) -> Iterator[tuple[FilterSample, Optional[Reject]]]:
    """Samples of one tar in order (members grouped by key), each with a read error if any."""
    name = shard_name(path)
    for rec in formats._iter_tar(path, os.path.dirname(path), ImageAccess(max_bytes=max_bytes)):
        members = rec.payload
        sample = FilterSample(key=rec.key, shard=name, members=members)
        sample.image_ext = next((e for e in members if e in IMAGE_EXTS), None)
        if rec.error:
            reason, _, detail = rec.error.partition(": ")
            yield sample, Reject(reason, detail)
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


class ShardOut:
    """One output tar, written as NAME.tar.tmp and renamed when the shard is complete."""

    def __init__(self, out_dir: str, name: str):
        self.path = os.path.join(out_dir, name + ".tar")
        self.tar = tarfile.open(self.path + ".tmp", "w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def add(self, sample: FilterSample) -> None:
        for ext, data in sample.members.items():
            info = tarfile.TarInfo(f"{sample.key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def commit(self) -> None:
        self.tar.close()
        os.replace(self.path + ".tmp", self.path)


@dataclass
class FilterResult:
    """What a run did: counts, removals by stage and reason, where the files are."""

    samples: int = 0
    kept: int = 0
    removed: dict = field(default_factory=dict)
    """stage -> reason -> count (stage ``read`` for samples broken in the tar)."""
    shards: dict = field(default_factory=dict)
    """output shard name -> kept samples."""
    scores: dict = field(default_factory=dict)
    """score name -> list of values over the samples that reached that stage."""
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    """stage -> seconds spent in it (where the time goes, for docs/performance.md)."""


def run_filters(inputs: list[str], out_dir: str, cfg: FilterConfig, max_bytes: int = formats.DEFAULT_MAX_IMAGE_BYTES,
                progress: bool = False) -> FilterResult:
    """Filter every input shard into ``out_dir``; returns the counts (also in the report)."""
    paths = formats.expand_inputs(inputs)
    bad = [p for p in paths if not p.endswith(".tar")]
    if bad:
        raise ValueError(f"input {bad[0]}: not a WebDataset .tar shard")
    names = [shard_name(p) for p in paths]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ValueError(f"two inputs are both named {dup}.tar; filter them into different --output-dir")
    os.makedirs(out_dir, exist_ok=True)
    if any(os.path.realpath(p).startswith(os.path.realpath(out_dir) + os.sep) for p in paths):
        raise ValueError(f"--output-dir {out_dir} holds input shards; write to another folder")
    stages = build_stages(cfg)
    res, start = FilterResult(), time.perf_counter()
    rejects_path = os.path.join(out_dir, REJECTS)
    with open(rejects_path + ".tmp", "w", encoding="utf-8") as rej:
        for path in paths:
            out = ShardOut(out_dir, shard_name(path))
            for sample, reject in read_shard(path, max_bytes):
                res.samples += 1
                stage = "read"
                if reject is None:
                    for st in stages:
                        t0 = time.perf_counter()
                        reject = st.process(sample)
                        res.stage_seconds[st.name] = res.stage_seconds.get(st.name, 0.0) + time.perf_counter() - t0
                        if reject is not None:
                            stage = st.name
                            break
                for k, v in sample.scores.items():
                    res.scores.setdefault(k, []).append(v)
                if reject is None:
                    out.add(sample)
                    continue
                res.removed.setdefault(stage, {}).setdefault(reject.reason, 0)
                res.removed[stage][reject.reason] += 1
                rej.write(json.dumps({"key": sample.key, "shard": sample.shard, "stage": stage,
                                      "reason": reject.reason, "detail": reject.detail,
                                      "caption": sample.caption}, ensure_ascii=True) + "\n")
            out.commit()
            res.shards[out.path] = out.count
            res.kept += out.count
            if progress:
                print(f"filter: {path} -> {out.path}: kept {out.count} (total {res.kept}/{res.samples})", flush=True)
    os.replace(rejects_path + ".tmp", rejects_path)
    res.seconds = time.perf_counter() - start
    write_report(out_dir, paths, cfg, res)
    return res


def write_report(out_dir: str, paths: list[str], cfg: FilterConfig, res: FilterResult) -> str:
    """filter_report.json (counts, removals by stage and reason, score summaries, config,
    throughput) and filter_report.png (histograms), both next to the output."""
    from megatron_sail.curate.filters.report import plot_histograms

    summary = {k: {"n": len(v), "min": min(v), "mean": sum(v) / len(v), "max": max(v)}
               for k, v in sorted(res.scores.items()) if v}
    by_reason: dict = {}
    for reasons in res.removed.values():
        for r, n in reasons.items():
            by_reason[r] = by_reason.get(r, 0) + n
    report = {"inputs": paths, "samples": res.samples, "kept": res.kept, "removed": res.samples - res.kept,
              "removed_by_reason": dict(sorted(by_reason.items())),
              "removed_by_stage": {k: dict(sorted(v.items())) for k, v in res.removed.items()},
              "shards": {os.path.basename(k): v for k, v in res.shards.items()},
              "scores": summary, "seconds": round(res.seconds, 3),
              "stage_seconds": {k: round(v, 3) for k, v in res.stage_seconds.items()},
              "images_per_s": round(res.samples / res.seconds, 2) if res.seconds > 0 else None,
              "rejects": REJECTS, "histogram": REPORT_PNG, "config": dataclasses.asdict(cfg)}
    path = os.path.join(out_dir, REPORT_JSON)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    plot_histograms(res.scores, os.path.join(out_dir, REPORT_PNG))
    return path
