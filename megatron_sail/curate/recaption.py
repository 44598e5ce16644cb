"""Recaption: ``run(RecaptionConfig) -> summary``, the API behind tools/recaption.py.

Picks this task's shards (``shard_index::num_shards`` for SLURM arrays), skips those with a
done marker, runs the rest on the chosen executor (local, or Ray tasks on actors holding one
model each), retries failed shards, and rebuilds ``done_manifest.json``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

from megatron_sail.config.images import DEFAULT_MAX_IMAGE_PIXELS
from megatron_sail.curate.backends import BackendConfig
from megatron_sail.curate.prompts import PromptBankConfig
from megatron_sail.curate.reader import ReaderConfig, ShardSpec, list_shards, shard_size
from megatron_sail.curate.writer import is_done, write_manifest

EXECUTORS = ("local", "ray")
SIZE_SAMPLE = 32
"""Shards whose samples are counted for the progress bar's total (and ETA)."""


@dataclass
class RecaptionConfig:
    """One recaption run."""

    inputs: list[str]
    """Tar shards / JSONL files (globs allowed) or an image folder."""
    output_dir: str
    """Where NAME.tar, NAME.rejects.jsonl, done/ and done_manifest.json go."""
    backend: BackendConfig = field(default_factory=BackendConfig)
    """Model and decoding; its seed is replaced by ``seed``."""
    image_root: Optional[str] = None
    """Root of relative image paths in JSONL inputs (default: each file's folder)."""
    prompt_file: Optional[str] = None
    """Prompt bank file (one prompt a line, or a JSON list); None: the built-in bank."""
    seed: int = 1234
    """Seed of the prompt draw and of sampling."""
    samples_per_shard: int = 1000
    """Records per shard for JSONL files and image folders."""
    shard_index: int = 0
    """This task's index among ``num_shards`` (SLURM_ARRAY_TASK_ID)."""
    num_shards: int = 1
    """Tasks sharing the input (SLURM array size): task i takes shards i, i+n, i+2n, ..."""
    executor: str = "local"
    """'local' (this machine, no cluster) or 'ray'."""
    workers: int = 1
    """Captioner processes (local) or actors (ray), each holding one model."""
    shard_retries: int = 2
    """Times a shard that raised is tried again before it is reported failed."""
    ray_address: Optional[str] = None
    """Ray cluster to join (None: start a local one with ``ray_num_cpus``)."""
    ray_num_cpus: Optional[int] = None
    """CPUs of the local Ray instance (None: all)."""
    gpus_per_worker: float = 0.0
    """GPUs per captioner actor (1 on GPU clusters)."""
    cpus_per_worker: float = 1.0
    """CPUs per captioner actor / local worker thread budget."""
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Larger images are ``undecodable_image`` rejects (decompression bombs)."""
    max_image_bytes: int = 128 << 20
    """Larger image files are ``file_too_large`` rejects."""
    progress: bool = True
    """Show a progress bar (images/s, ETA) on stderr."""

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"--executor must be local or ray, got {self.executor!r}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"--shard-index {self.shard_index} must be in [0, --num-shards {self.num_shards})")
        if self.workers < 1 or self.shard_retries < 0:
            raise ValueError(f"workers ({self.workers}) must be >= 1 and shard_retries ({self.shard_retries}) >= 0")
        if not self.inputs:
            raise ValueError("no --input given")

    def reader_config(self) -> ReaderConfig:
        return ReaderConfig(list(self.inputs), self.image_root, self.samples_per_shard, self.max_image_bytes)

    def backend_config(self) -> BackendConfig:
        from dataclasses import replace

        return replace(self.backend, seed=self.seed)

    def prompt_config(self) -> PromptBankConfig:
        return PromptBankConfig(self.prompt_file, self.seed)


def my_shards(cfg: RecaptionConfig) -> list[ShardSpec]:
    """This task's part of all shards (stable order, so array tasks never overlap)."""
    return list_shards(cfg.reader_config())[cfg.shard_index::cfg.num_shards]


def make_progress(cfg: RecaptionConfig, pending: list[ShardSpec]):
    """A tqdm bar over the pending images (images/s and ETA), or None."""
    if not cfg.progress:
        return None
    from tqdm import tqdm

    # counting a tar means reading its headers: past SIZE_SAMPLE shards, extrapolate their mean
    sizes = [shard_size(s, cfg.reader_config()) for s in pending[:SIZE_SAMPLE]]
    known = [n for n in sizes if n is not None]
    total = round(sum(known) / len(known) * len(pending)) if known else None
    return tqdm(total=total, unit="img", desc="recaption", dynamic_ncols=True, smoothing=0.1)


def run(cfg: RecaptionConfig) -> dict:
    """Recaption this task's shards; returns counts, failures and throughput."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("recaption runs one process per task (SLURM array, --workers, Ray), not under "
                         "torchrun: every rank would caption every shard")
    os.makedirs(cfg.output_dir, exist_ok=True)
    shards = my_shards(cfg)
    pending = [s for s in shards if not is_done(cfg.output_dir, s.name)]
    start = time.time()
    bar = make_progress(cfg, pending)
    try:
        if cfg.executor == "ray":
            from megatron_sail.curate.executor_ray import RayExecutor
            results, failed, retries = RayExecutor(cfg).run(pending, bar)
        else:
            from megatron_sail.curate.executor_local import LocalExecutor
            results, failed, retries = LocalExecutor(cfg).run(pending, bar)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.time() - start
    manifest = write_manifest(cfg.output_dir)
    by_reason: dict[str, int] = {}
    for r in results.values():
        for k, v in r["rejects_by_reason"].items():
            by_reason[k] = by_reason.get(k, 0) + v
    samples = sum(r["samples"] for r in results.values())
    return {"output_dir": cfg.output_dir, "manifest": manifest, "shards": len(shards),
            "skipped_done": len(shards) - len(pending), "shards_done": sorted(results),
            "failed_shards": failed, "samples": samples,
            "captioned": sum(r["captioned"] for r in results.values()),
            "rejected": sum(r["rejected"] for r in results.values()), "rejects_by_reason": dict(sorted(by_reason.items())),
            "request_retries": retries, "seconds": round(seconds, 3),
            "images_per_s": round(samples / seconds, 3) if seconds > 0 else None,
            "executor": cfg.executor, "workers": cfg.workers}
