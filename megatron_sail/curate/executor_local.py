"""Local executor: shards run in this process (1 worker) or in N spawned worker processes.

Shared by every curation pass (curate/job.py). Each worker process loads the model once and
takes shards from a pool, so N workers hold N
models; on a CPU they share its cores. A shard that raises is retried up to ``shard_retries``
times (its partial files were removed), then reported failed; the other shards go on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from megatron_sail.curate.reader import ShardSpec
from megatron_sail.platform.parent_watch import watch_parent

_WORKER = None


def worker_from(cfg):
    """The per-shard worker a pass's config builds (ShardWorker for recaption, the filter and
    signature workers for filter_data and dedup): see curate/job.py."""
    return cfg.make_worker()


def _init(cfg, parent: int) -> None:
    global _WORKER
    watch_parent(parent)  # a killed run takes its workers with it; they never commit after it
    _WORKER = worker_from(cfg)


def _process(spec: ShardSpec) -> tuple[dict, int]:
    before = _WORKER.retries()
    marker = _WORKER.process(spec)
    return marker, _WORKER.retries() - before


def failure(spec: ShardSpec, error: BaseException, attempts: int) -> dict:
    return {
        "shard": spec.name,
        "source": spec.source,
        "attempts": attempts,
        "error": f"{type(error).__name__}: {error}",
    }


class LocalExecutor:
    """Runs shards here, with retries."""

    def __init__(self, cfg):
        self.cfg = cfg

    def run(self, pending: list[ShardSpec], bar) -> tuple[dict, list, int]:
        """(markers by shard name, failed shards, request retries)."""
        if not pending:
            return {}, [], 0
        if self.cfg.workers == 1:
            return self._inline(pending, bar)
        return self._pool(pending, bar)

    def _inline(self, pending, bar):
        worker = worker_from(self.cfg)
        worker.load()  # a backend that cannot load is an error of the run, not of every shard
        results, failed = {}, []
        try:
            for spec in pending:
                for attempt in range(1, self.cfg.shard_retries + 2):
                    try:
                        results[spec.name] = worker.process(spec, bar.update if bar is not None else None)
                        break
                    except Exception as e:  # noqa: BLE001 - retried, then reported
                        if attempt > self.cfg.shard_retries:
                            failed.append(failure(spec, e, attempt))
            return results, failed, worker.retries()
        finally:
            worker.close()

    def _pool(self, pending, bar):
        results, failed, retries = {}, [], 0
        ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch/distributed state
        with ProcessPoolExecutor(
            self.cfg.workers, mp_context=ctx, initializer=_init, initargs=(self.cfg, os.getpid())
        ) as pool:
            running = {pool.submit(_process, s): (s, 1) for s in pending}
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    spec, attempt = running.pop(fut)
                    try:
                        marker, r = fut.result()
                    except Exception as e:  # noqa: BLE001
                        if attempt > self.cfg.shard_retries:
                            failed.append(failure(spec, e, attempt))
                        else:
                            running[pool.submit(_process, spec)] = (spec, attempt + 1)
                        continue
                    results[spec.name] = marker
                    retries += r
                    if bar is not None:
                        bar.update(marker["samples"])
        return results, failed, retries
