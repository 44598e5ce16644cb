"""Run one complexity method over the inputs, shard by shard, resumably (tools/score_complexity.py).

A shard (``samples_per_shard`` records of one file) is parsed, scored in batches and published
as one sidecar file (sidecar.py); a rerun skips the shards already published, so an interrupted
run resumes where it stopped. ``--shard-index I --num-shards N`` splits the shards between
machines (shard s is done by machine s % N)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from megatron_sail.curate.complexity import sidecar
from megatron_sail.curate.complexity.samples import InputConfig, Reject, input_files, iter_shards, parse
from megatron_sail.data.preprocess.formats import describe_formats

METHODS = ("heuristic", "ifd", "judge")


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring run."""

    inputs: InputConfig
    """What to read (the preprocessing flags)."""
    output_dir: str
    """Sidecar folder."""
    method: str = "heuristic"
    """heuristic, ifd or judge."""
    model: str = ""
    """Reference checkpoint (ifd) or judge model (judge)."""
    samples_per_shard: int = 1000
    """Records per published shard."""
    batch_size: int = 32
    """Samples handed to the scorer at once."""
    shard_index: int = 0
    """This machine's share of the shards."""
    num_shards: int = 1
    """Machines sharing the shards."""
    extra: dict = field(default_factory=dict)
    """Method settings recorded in complexity.json (max tiles, judge backend, ...)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.samples_per_shard < 1 or self.batch_size < 1:
            raise ValueError("--samples-per-shard and --batch-size must be >= 1")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"--shard-index {self.shard_index} not in [0, {self.num_shards})")


def _check_dir(cfg: ScoreConfig) -> None:
    """One sidecar folder holds one method's scores (mixing them would mix scales)."""
    path = os.path.join(cfg.output_dir, "complexity.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("method") != cfg.method or old.get("model", "") != cfg.model:
            raise ValueError(
                f"{cfg.output_dir} holds {old.get('method')} scores of model "
                f"{old.get('model') or '-'}; use another --output-dir for {cfg.method}"
            )


def _write_manifest(cfg: ScoreConfig, totals: dict) -> None:
    os.makedirs(cfg.output_dir, exist_ok=True)
    path = os.path.join(cfg.output_dir, "complexity.json")
    body = {
        "method": cfg.method,
        "model": cfg.model,
        "inputs": list(cfg.inputs.inputs),
        "format": cfg.inputs.format,
        "image_root": cfg.inputs.image_root,
        "seed": cfg.inputs.seed,
        "samples_per_shard": cfg.samples_per_shard,
        "settings": cfg.extra,
        "last_run": totals,
    }
    with open(path + ".tmp", "w") as f:
        json.dump(body, f, indent=1)
    os.replace(path + ".tmp", path)


def score_shard(records: list, fmt: str, cfg: ScoreConfig, first_index: int, scorer) -> tuple[list, list]:
    """(score records, reject records) of one shard."""
    scored, rejects, samples = [], [], []
    for k, rec in enumerate(records):
        item = parse(rec, fmt, cfg.inputs, first_index + k)
        if isinstance(item, Reject):
            rejects.append(
                {"source": item.source, "key": item.key, "reason": item.reason, "detail": item.detail}
            )
        else:
            samples.append(item)
    for lo in range(0, len(samples), cfg.batch_size):
        batch = samples[lo : lo + cfg.batch_size]
        for s, res in zip(batch, scorer.score(batch)):
            if isinstance(res, Exception):
                rejects.append(
                    {
                        "source": s.source,
                        "key": s.key,
                        "reason": getattr(res, "reason", "score_error"),
                        "detail": f"{type(res).__name__}: {res}"[:300],
                    }
                )
            else:
                scored.append({"source": s.source, "key": s.key, "method": cfg.method, **res})
    return scored, rejects


def run_scoring(cfg: ScoreConfig, scorer, log: Callable[[str], None] = print) -> dict:
    """Score every shard not published yet; returns the totals of this run."""
    _check_dir(cfg)
    files, formats = input_files(cfg.inputs)
    for line in describe_formats(formats):
        log(f"[complexity] {line}")
    writer = getattr(scorer, "writer", True)
    totals = {"shards_scored": 0, "shards_skipped": 0, "samples": 0, "rejected": 0, "seconds": 0.0}
    t0, index, global_shard = time.perf_counter(), 0, 0
    for path in files:
        fmt = formats[path]
        for shard, records in iter_shards(path, fmt, cfg.inputs, cfg.samples_per_shard):
            mine = global_shard % cfg.num_shards == cfg.shard_index
            global_shard += 1
            first, index = index, index + len(records)
            if not mine:
                continue
            if sidecar.shard_done(cfg.output_dir, path, shard):
                totals["shards_skipped"] += 1
                continue
            scored, rejects = score_shard(records, fmt, cfg, first, scorer)
            if writer:
                sidecar.write_shard(cfg.output_dir, path, shard, scored, rejects)
            totals["shards_scored"] += 1
            totals["samples"] += len(scored)
            totals["rejected"] += len(rejects)
            log(
                f"[complexity] {os.path.basename(path)} shard {shard}: {len(scored)} scored, "
                f"{len(rejects)} rejected"
            )
    totals["seconds"] = round(time.perf_counter() - t0, 2)
    if writer:
        _write_manifest(cfg, totals)
    return totals


def make_scorer(cfg: ScoreConfig, settings: dict):
    """The scorer of ``cfg.method`` (models are loaded here, once)."""
    if cfg.method == "heuristic":
        from megatron_sail.curate.complexity.heuristic import HeuristicConfig, HeuristicScorer

        return HeuristicScorer(HeuristicConfig(**settings))
    if not cfg.model:
        raise ValueError(f"--method {cfg.method} needs --model")
    if cfg.method == "ifd":
        from megatron_sail.curate.complexity.ifd import IfdConfig, IfdScorer

        return IfdScorer(IfdConfig(cfg.model, **settings))
    from megatron_sail.curate.complexity.judge import JudgeConfig, JudgeScorer

    return JudgeScorer(JudgeConfig(model=cfg.model, **settings))
