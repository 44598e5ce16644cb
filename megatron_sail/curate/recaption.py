"""Recaption: ``run(RecaptionConfig) -> summary``, the API behind tools/recaption.py.

The sharded job of curate/job.py (this task's shards, skip done ones, local or Ray executor,
retries, ``done_manifest.json``) with ShardWorker (read -> caption -> write) as the worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_sail.config.images import DEFAULT_MAX_IMAGE_PIXELS
from megatron_sail.curate.backends import BackendConfig
from megatron_sail.curate.job import EXECUTORS, check_job, run_job, sum_reasons, task_shards
from megatron_sail.curate.prompts import PromptBankConfig
from megatron_sail.curate.reader import ReaderConfig, ShardSpec, list_shards, shard_size

__all__ = ["EXECUTORS", "RecaptionConfig", "my_shards", "run"]
SIZE_SAMPLE = 32
"""Shards whose samples are counted for the progress bar's total (and ETA)."""


@dataclass
class RecaptionConfig:
    """One recaption run (the job fields, shard_index..progress, are curate/job.py's JobConfig's)."""

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
    num_shards: int = 1
    executor: str = "local"
    workers: int = 1
    """Captioner processes (local) or actors (ray), each holding one model."""
    shard_retries: int = 2
    ray_address: Optional[str] = None
    ray_num_cpus: Optional[int] = None
    gpus_per_worker: float = 0.0
    """GPUs per captioner actor (1 on GPU clusters)."""
    cpus_per_worker: float = 1.0
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Larger images are ``undecodable_image`` rejects (decompression bombs)."""
    max_image_bytes: int = 128 << 20
    """Larger image files are ``file_too_large`` rejects."""
    max_sample_bytes: Optional[int] = None
    """Largest sum of one tar sample's members (None: twice max_image_bytes): ``sample_too_large``."""
    progress: bool = True
    """Show a progress bar (images/s, ETA) on stderr."""

    def __post_init__(self) -> None:
        check_job(self)
        if not self.inputs:
            raise ValueError("no --input given")

    def reader_config(self) -> ReaderConfig:
        return ReaderConfig(
            list(self.inputs),
            self.image_root,
            self.samples_per_shard,
            self.max_image_bytes,
            self.max_sample_bytes,
        )

    def backend_config(self) -> BackendConfig:
        from dataclasses import replace

        return replace(self.backend, seed=self.seed)

    def prompt_config(self) -> PromptBankConfig:
        return PromptBankConfig(self.prompt_file, self.seed)

    def make_worker(self):
        """The per-shard worker the executors run (curate/job.py)."""
        from megatron_sail.curate.worker import ShardWorker

        return ShardWorker(
            self.reader_config(),
            self.backend_config(),
            self.prompt_config(),
            self.output_dir,
            self.max_pixels,
        )


def my_shards(cfg: RecaptionConfig) -> list[ShardSpec]:
    """This task's part of all shards (stable order, so array tasks never overlap)."""
    return task_shards(cfg, list_shards(cfg.reader_config()))


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
    res = run_job(
        cfg,
        list_shards(cfg.reader_config()),
        lambda pending: make_progress(cfg, pending),
        totals=("samples", "captioned"),
    )
    results = res.pop("results")
    return {
        **res,
        "captioned": sum(r["captioned"] for r in results.values()),
        "rejected": sum(r["rejected"] for r in results.values()),
        "rejects_by_reason": sum_reasons(results),
    }
