"""Run a function on N local gloo ranks (CPU) and collect what each rank returns.

Used by the distributed tests: ``results = launch(fn, world_size, *args)``. ``fn(rank, *args)``
must be a module-level function (processes are spawned, so it is pickled by reference) and
return something picklable (CPU tensors, numbers, dicts). Each rank gets RANK/WORLD_SIZE/
MASTER_ADDR/MASTER_PORT set, so ``megatron_sail.platform.distributed.initialize`` (or plain
``torch.distributed.init_process_group``) works unchanged inside ``fn``. An exception on any
rank, or a rank dying, fails the launch with that rank's traceback.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that is free right now on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(value) -> bytes:
    """Serialize a result by value: tensors sent through a Queue as shared-memory handles
    vanish when the sending process exits before the receiver opens them."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    """Inverse of ``_to_bytes``."""
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank, world_size, port, fn, args, results):
    """Child process body: set the rendezvous env, run fn, report (rank, ok, value)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        import torch

        torch.set_num_threads(1)
        results.put((rank, True, _to_bytes(fn(rank, *args))))
    except BaseException:  # report everything, including assertion failures
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _collect(procs, results, world_size, timeout):
    """Gather (rank -> value) until all ranks reported, one failed, one died, or time ran out."""
    out, errors = {}, []
    deadline = time.monotonic() + timeout
    while len(out) < world_size and not errors:
        try:
            rank, ok, value = results.get(timeout=1.0)
        except queue.Empty:
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                errors.append(
                    f"ranks {dead} died (exit codes {[procs[i].exitcode for i in dead]}) without reporting"
                )
            elif time.monotonic() > deadline:
                errors.append(f"timed out after {timeout}s (reported: {sorted(out)})")
            continue
        if ok:
            out[rank] = _from_bytes(value)
        else:
            errors.append(f"rank {rank} failed:\n{value}")
    return out, errors


def launch(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned processes; return results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        out, errors = _collect(procs, results, world_size, timeout)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [out[r] for r in range(world_size)]
