"""Worker processes for preprocessing: blocks in, results out in block order, and a worker
that dies (the out-of-memory killer, a SIGKILL) never hangs the run.

``multiprocessing.Pool`` replaces a killed worker but loses its task, so waiting on that result
blocks forever. ``concurrent.futures.ProcessPoolExecutor`` notices the dead process and fails
every unfinished future with ``BrokenProcessPool``. The blocks that were lost are then run
once more in a fresh pool (a block's result depends only on its records, so the output is the
same as an undisturbed run's); a second death stops the run with ``WorkerDied``, which names the
records in flight. Results already received are kept either way.

Test hook (used by tests/unit/test_data_preprocess.py, read only inside pool workers, never by
the single-process path): ``SAIL_TEST_KILL_WORKER_AT=N`` makes the worker that receives the
block holding global record N SIGKILL itself before building it;
``SAIL_TEST_KILL_WORKER_AT=N:FLAG`` does so only if it can create the file FLAG (so only the
first attempt dies and the retry succeeds).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Iterator

from megatron_sail.platform.parent_watch import guarded_initializer

KILL_ENV = "SAIL_TEST_KILL_WORKER_AT"
"""Environment variable of the test hook (see the module docstring)."""


class WorkerDied(RuntimeError):
    """A worker process died twice on the same work: the run stops, nothing is published."""


@dataclass
class PoolConfig:
    """How blocks are spread over worker processes."""

    workers: int
    """Worker processes."""
    in_flight: int
    """Most blocks submitted and not yet handed back (bounds memory)."""
    retries: int = 1
    """Fresh pools started after a worker died, before the run stops."""


def maybe_kill_self(record_indices: list[int]) -> None:
    """The test hook: SIGKILL this worker when its block holds the chosen record."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    at, _, flag = spec.partition(":")
    if int(at) not in record_indices:
        return
    if flag:
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # an earlier attempt already died here: let this one live
    os.kill(os.getpid(), signal.SIGKILL)


def describe(entries: list, where: str) -> str:
    """The records in flight, for the error: block ids, record indices, first and last source."""
    r0, r1 = entries[0][1][0], entries[-1][1][-1]
    blocks = ", ".join(str(b) for b, _, _ in entries)
    return (
        f"block(s) {blocks} of {where} (input records {r0[0]}..{r1[0]}, counted from 0 over "
        f"all inputs; from {r0[1].source} {r0[1].key} to {r1[1].source} {r1[1].key})"
    )


def _stop(pool: ProcessPoolExecutor) -> None:
    """Shut a pool down without waiting for the blocks still running (an error or an interrupt
    ends the run; its results would be thrown away). Python < 3.14 has no public
    terminate_workers, so the live processes are terminated from the executor's table."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)


def ordered_map(
    cfg: PoolConfig,
    fn: Callable,
    blocks: Iterator[tuple[int, list]],
    initializer: Callable,
    initargs: tuple,
    finish: Callable,
    where: str = "the run",
    log: Callable[[str], None] = print,
) -> Iterator:
    """``finish(fn(block, records), records)`` for every block, in block order.

    ``blocks`` yields (block id, [(record index, RawRecord)]); ``fn`` runs in a worker
    (forked, set up by ``initializer(*initargs)``), ``finish`` in this process; ``where``
    names the shard in the error; ``log`` gets one line per retry.
    """
    ctx = mp.get_context("fork")
    # workers die with this process (kill -9 of the run must not leave them behind)
    guarded = (os.getpid(), initializer, initargs)
    make = lambda: ProcessPoolExecutor(cfg.workers, ctx, guarded_initializer, guarded)  # noqa: E731
    pool = make()
    pending: deque = deque()  # (block, records, future)
    retries = cfg.retries
    clean = False
    try:
        source = iter(blocks)
        while True:
            while len(pending) < cfg.in_flight:
                nxt = next(source, None)
                if nxt is None:
                    break
                pending.append((nxt[0], nxt[1], pool.submit(fn, nxt[0], nxt[1])))
            if not pending:
                break
            block, recs, fut = pending[0]
            try:
                res = fut.result()
            except BrokenProcessPool:
                wait([f for _, _, f in pending])  # a broken pool fails every unfinished future
                lost = [e for e in pending if _failed(e[2])]
                if retries <= 0:
                    raise WorkerDied(
                        f"a preprocessing worker process died again after a retry, while building "
                        f"{describe(lost, where)}. Likely cause: it was killed from outside (the "
                        f"out-of-memory killer, or a signal; see dmesg). Nothing was published; "
                        f"rerun the same command (it starts over and gives the output an "
                        f"undisturbed run gives), with fewer --workers to use less memory, or "
                        f"split the input with --shard-index/--num-shards"
                    ) from None
                retries -= 1
                log(
                    f"[preprocess] a worker process died while building {describe(lost, where)} "
                    f"(killed from outside, e.g. out of memory?); running those blocks again in a "
                    f"fresh pool"
                )
                _stop(pool)
                pool = make()
                pending = deque((b, r, pool.submit(fn, b, r) if _failed(f) else f) for b, r, f in pending)
                continue
            pending.popleft()
            yield finish(res, recs)
        clean = True
    finally:
        if clean:
            pool.shutdown(wait=True)
        else:
            _stop(pool)


def _failed(fut: Future) -> bool:
    """Whether a (done) future was lost with a broken pool; finished ones keep their results."""
    return fut.cancelled() or isinstance(fut.exception(), BrokenProcessPool)
