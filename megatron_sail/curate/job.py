"""The sharded, resumable job every curation pass runs on: recaption, filter_data and the dedup
signature pass share it (one executor and done-manifest implementation, not one per tool).

A pass is a config holding the fields of ``JobConfig`` (declared in each pass's own config,
so that its positional fields come first) plus ``make_worker()``, which returns an
object with ``load()``, ``process(spec, progress=None) -> marker``, ``retries()`` and
``close()`` (built in the worker process / Ray actor, so a model loads once per worker). ``run_job``
takes this task's part of the shards (``shard_index::num_shards``: SLURM arrays), skips those
with a done marker, runs the rest on the local or Ray executor with retries, and rebuilds
``done_manifest.json`` from the markers of the whole output folder.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_sail.curate.reader import ShardSpec
from megatron_sail.curate.writer import is_done, write_manifest

EXECUTORS = ("local", "ray")


@dataclass
class JobConfig:
    """How a pass's shards are spread over tasks, workers and retries (fields every pass shares)."""

    output_dir: str = ""
    """Where the output shards, done/ and done_manifest.json go."""
    shard_index: int = 0
    """This task's index among ``num_shards`` (SLURM_ARRAY_TASK_ID)."""
    num_shards: int = 1
    """Tasks sharing the input (SLURM array size): task i takes shards i, i+n, i+2n, ..."""
    executor: str = "local"
    """'local' (this machine, no cluster) or 'ray'."""
    workers: int = 1
    """Worker processes (local) or actors (ray)."""
    shard_retries: int = 2
    """Times a shard that raised is tried again before it is reported failed."""
    ray_address: Optional[str] = None
    """Ray cluster to join (None: start a local one with ``ray_num_cpus``)."""
    ray_num_cpus: Optional[int] = None
    """CPUs of the local Ray instance (None: all)."""
    gpus_per_worker: float = 0.0
    """GPUs per Ray actor (1 for a model on a GPU cluster)."""
    cpus_per_worker: float = 1.0
    """CPUs per Ray actor / local worker thread budget."""
    progress: bool = True
    """Show a progress bar on stderr."""


def check_job(cfg) -> None:
    """The shared flag checks of a pass config holding JobConfig's fields (one-line errors)."""
    if cfg.executor not in EXECUTORS:
        raise ValueError(f"--executor must be local or ray, got {cfg.executor!r}")
    if cfg.num_shards < 1 or not 0 <= cfg.shard_index < cfg.num_shards:
        raise ValueError(f"--shard-index {cfg.shard_index} must be in [0, --num-shards {cfg.num_shards})")
    if cfg.workers < 1 or cfg.shard_retries < 0:
        raise ValueError(f"workers ({cfg.workers}) must be >= 1 and shard_retries ({cfg.shard_retries}) >= 0")


def add_job_flags(p, workers_help: str = "worker processes (local) or actors (ray)") -> None:
    """The flags every sharded curation tool takes (recaption, filter_data, dedup signatures)."""
    p.add_argument(
        "--shard-index",
        type=int,
        metavar="I",
        help="this task's index among --num-shards (default: SLURM_ARRAY_TASK_ID, else 0)",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        metavar="N",
        help="tasks sharing the input; task I takes shards I, I+N, ... (default: SLURM array size, else 1)",
    )
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="where the shards run: local (this machine) or ray (default: local)",
    )
    p.add_argument("--workers", type=int, default=1, metavar="N", help=f"{workers_help} (default: 1)")
    p.add_argument(
        "--shard-retries",
        type=int,
        default=2,
        metavar="N",
        help="times a failed shard is tried again before it is reported (default: 2)",
    )
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: start a local one)")
    p.add_argument(
        "--ray-num-cpus", type=int, metavar="N", help="CPUs of a local Ray instance (default: all)"
    )
    p.add_argument(
        "--gpus-per-worker", type=float, default=0.0, metavar="G", help="GPUs per Ray actor (default: 0)"
    )
    p.add_argument(
        "--cpus-per-worker", type=float, default=1.0, metavar="C", help="CPUs per Ray actor (default: 1)"
    )


def array_task(index: Optional[int], count: Optional[int], prog: str) -> tuple[int, int]:
    """(index, count) from the flags, else from a SLURM array, else (0, 1)."""
    env = os.environ
    if index is None and "SLURM_ARRAY_TASK_ID" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if count is None and "SLURM_ARRAY_TASK_COUNT" in env:
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    if (index is None) != (count is None):
        raise ValueError(f"{prog}: give both --shard-index and --num-shards")
    return (index or 0, count or 1)


def job_fields(a, prog: str) -> dict:
    """JobConfig's fields from the flags of add_job_flags."""
    index, count = array_task(a.shard_index, a.num_shards, prog)
    return {
        "shard_index": index,
        "num_shards": count,
        "executor": a.executor,
        "workers": a.workers,
        "shard_retries": a.shard_retries,
        "ray_address": a.ray_address,
        "ray_num_cpus": a.ray_num_cpus,
        "gpus_per_worker": a.gpus_per_worker,
        "cpus_per_worker": a.cpus_per_worker,
    }


def _int(env, key: str) -> int:
    """An integer launcher variable (absent or not a number: 1, i.e. no parallel launch)."""
    try:
        return int(env.get(key, "1"))
    except ValueError:
        return 1


def parallel_launch(env) -> Optional[str]:
    """The launcher that started several copies of this process, or None. torchrun marks its
    workers with TORCHELASTIC_RUN_ID (a WORLD_SIZE alone is no launch: it may be left over in a
    shell or a test process); an srun step counts SLURM_STEP_NUM_TASKS. One copy per task
    (SLURM array, a lone process) is the design; several copies each taking every shard is not."""
    world = _int(env, "WORLD_SIZE")
    if "TORCHELASTIC_RUN_ID" in env and world > 1:
        return f"torchrun (WORLD_SIZE={world})"
    tasks = _int(env, "SLURM_STEP_NUM_TASKS")
    if "SLURM_PROCID" in env and tasks > 1:
        return f"an srun step of {tasks} tasks"
    return None


def task_shards(cfg: JobConfig, shards: list[ShardSpec]) -> list[ShardSpec]:
    """This task's part of all shards (stable order, so array tasks never overlap)."""
    return shards[cfg.shard_index :: cfg.num_shards]


def run_job(
    cfg,
    shards: list[ShardSpec],
    bar_factory: Optional[Callable] = None,
    totals: tuple[str, ...] = ("samples",),
) -> dict:
    """Run this task's pending shards; returns what every pass reports (counts come from the
    markers: ``results`` maps shard name -> marker)."""
    launcher = parallel_launch(os.environ)
    if launcher is not None and cfg.num_shards == 1:
        raise ValueError(
            f"curation passes run one process per task (SLURM array, --workers, Ray), not under "
            f"{launcher}: every copy would process every shard (or give each copy "
            f"--shard-index/--num-shards)"
        )
    os.makedirs(cfg.output_dir, exist_ok=True)
    mine = task_shards(cfg, shards)
    suffix = getattr(cfg, "output_suffix", ".tar")
    pending = [s for s in mine if not is_done(cfg.output_dir, s.name, suffix)]
    start = time.time()
    bar = bar_factory(pending) if (bar_factory is not None and cfg.progress and pending) else None
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
    manifest = write_manifest(cfg.output_dir, totals, suffix)
    samples = sum(r["samples"] for r in results.values())
    return {
        "output_dir": cfg.output_dir,
        "manifest": manifest,
        "shards": len(mine),
        "skipped_done": len(mine) - len(pending),
        "shards_done": sorted(results),
        "failed_shards": failed,
        "results": results,
        "samples": samples,
        "request_retries": retries,
        "seconds": round(seconds, 3),
        "images_per_s": round(samples / seconds, 3) if seconds > 0 else None,
        "executor": cfg.executor,
        "workers": cfg.workers,
    }


def sum_reasons(results: dict) -> dict:
    """rejects_by_reason summed over markers, sorted by reason."""
    out: dict[str, int] = {}
    for r in results.values():
        for k, v in r.get("rejects_by_reason", {}).items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))
