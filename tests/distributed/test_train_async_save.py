"""--async-save on CPU/gloo: the saving step only plans and copies to host memory, a background
thread writes the files, and the checkpoint is published (rename, `latest`, pruning) only when a
later step boundary or the exit finalizes it.

Two gloo ranks calling the checkpoint functions: `latest` does not move while a write is in
flight on any rank, the saved tensors are the values at save time although training changes
them right after, and a write failing on one rank leaves only iter_N.tmp. End to end (tiny recipe): a DP=2 run with async saves stopped at step 10
and resumed on one rank repeats the uninterrupted losses; SIGTERM while writes are slowed (so one
is always pending) finalizes every save and exits 0.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing import ShardedTensor
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter

from launcher import launch
from megatron_sail.checkpoint import dcp, integrity, layout
from megatron_sail.training import checkpoint as ckpt
from test_train_runs import (  # noqa: F401 - `data` is a fixture
    COMMON,
    PARALLEL_RTOL,
    _cmd,
    data,
    losses,
    train,
)
from testkit import ROOT, subprocess_env


class Net(torch.nn.Module):
    """One parameter, sharded over the ranks along dim 0, standing in for a model chunk."""

    def __init__(self, rank: int, world: int):
        super().__init__()
        self.rank, self.world = rank, world
        self.w = torch.nn.Parameter(torch.arange(12.0).reshape(3, 4) + 100 * rank)

    def sharded_state_dict(self):
        return {
            "w": ShardedTensor.from_rank_offsets(
                "net.w", self.w.data, (0, self.rank, self.world), replica_id=0
            )
        }


def _latest(root) -> str:
    with open(os.path.join(root, "latest")) as f:
        return f.read().strip()


def _entries(root) -> list[str]:
    """The save folder's entries besides the trainer's run lock (training/save_dir.py)."""
    return sorted(n for n in os.listdir(root) if n != ".lock")


def _look(root) -> dict:
    """What a reader of the save folder sees now."""
    return {"latest": _latest(root), "entries": sorted(os.listdir(root))}


def _async_save_scenarios(rank: int, root: str) -> dict:
    """On each of 2 ranks: (1) an async save whose write on rank 1 waits for a release file,
    with the weights changed right after the save; (2) an async save whose write fails on
    rank 1 only. Returns what each rank observed."""
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.platform.distributed import initialize

    initialize(ParallelConfig())
    net, seen = Net(rank, 2), {}
    release = os.path.join(root, "..", "release")
    ckpt.save_checkpoint(root, [net], None, ckpt.TrainState(iteration=1), keep_last=1)
    original = dcp.HostCopyWriter.write
    if rank == 1:

        def held(self):
            deadline = time.time() + 60
            while not os.path.exists(release) and time.time() < deadline:
                time.sleep(0.05)
            original(self)

        dcp.HostCopyWriter.write = held
    pending = dcp.ThreadAsyncCallsQueue()
    state = ckpt.TrainState(iteration=2)
    ckpt.save_checkpoint(root, [net], None, state, keep_last=1, pending=pending)
    seen["expected"] = net.w.detach().clone()
    with torch.no_grad():
        net.w.add_(1000.0)  # the next optimizer step, while the files are being written
    state.iteration = 3
    seen["nonblocking"] = pending.maybe_finalize_async_calls(blocking=False)
    seen["during"] = _look(root)
    seen["manifest_during"] = os.path.exists(os.path.join(root, "iter_0000002.tmp", "manifest.json"))
    dist.barrier()
    if rank == 0:
        open(release, "w").close()
    seen["blocking"] = pending.maybe_finalize_async_calls(blocking=True)
    seen["after"] = _look(root)
    # The finalization hashed both ranks' files into the manifest before the rename.
    seen["verified"] = integrity.verify_checkpoint(os.path.join(root, "iter_0000002"), "full")
    seen["manifest_files"] = sorted(integrity.read_manifest(os.path.join(root, "iter_0000002"))["files"])
    target = Net(rank, 2)
    torch.nn.init.zeros_(target.w)
    seen["saved"] = dcp.load_sharded(
        {"model": target.sharded_state_dict()}, os.path.join(root, "iter_0000002")
    )["model"]["w"]
    seen["iteration"] = ckpt._read_train_state(os.path.join(root, "iter_0000002")).iteration

    dcp.HostCopyWriter.write = original
    if rank == 1:

        def disk_full(self, plan, planner):
            raise OSError("No space left on device")

        FileSystemWriter.write_data = disk_full
    ckpt.save_checkpoint(root, [net], None, ckpt.TrainState(iteration=4), keep_last=1, pending=pending)
    try:
        pending.maybe_finalize_async_calls(blocking=True)
        seen["failure"] = None
    except CheckpointException as e:
        seen["failure"] = str(e)
    seen["after_failure"] = _look(root)
    return seen


def test_async_save_publishes_only_at_finalization(tmp_path):
    """`latest` and the rename wait until every rank has written (rank 1 is held back); the
    checkpoint holds the values at save time; a write failing on one rank raises on every
    rank at finalization and leaves only iter_N.tmp, `latest` still on the previous save."""
    root = tmp_path / "ck"
    seen = launch(_async_save_scenarios, 2, str(root))
    for rank in (0, 1):
        s = seen[rank]
        assert s["nonblocking"] == [] and s["blocking"] == [0]
        assert s["during"] == {"latest": "1", "entries": ["iter_0000001", "iter_0000002.tmp", "latest"]}
        assert s["after"] == {"latest": "2", "entries": ["iter_0000002", "latest"]}
        assert torch.equal(s["saved"], s["expected"]) and s["iteration"] == 2
        assert not s["manifest_during"] and s["verified"] == "full"
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_state.pt"} <= set(s["manifest_files"])
        assert s["failure"] is not None
        assert s["after_failure"] == {
            "latest": "2",
            "entries": ["iter_0000002", "iter_0000004.tmp", "latest"],
        }
    assert "No space left on device" in seen[0]["failure"]


def test_async_saved_dp2_checkpoint_resumes_the_uninterrupted_curve(data, tmp_path):
    """Async saves every 3 steps at DP=2, stop after 10; resume on one rank: steps 11-14 track
    the uninterrupted single-rank run (and steps 1-10 of the DP=2 run do too)."""
    steps = ["--train-iters", "14"]  # --lr-decay-iters stays 20: same schedule as 20 steps
    ref = train(data, tmp_path / "ref", 1, steps)
    ck = tmp_path / "ckpt"
    first = train(
        data,
        tmp_path / "run",
        2,
        steps + ["--save", str(ck), "--save-interval", "3", "--exit-interval", "10", "--async-save"],
    )
    assert sorted(first) == list(range(1, 11))
    assert _latest(ck) == "10" and _entries(ck) == ["iter_0000009", "iter_0000010", "latest"]
    resumed = train(
        data, tmp_path / "resumed", 1, steps + ["--load", str(ck), "--save", str(ck), "--async-save"]
    )
    assert sorted(resumed) == list(range(11, 15)) and _latest(ck) == "14"
    for curve, its in ((first, range(1, 11)), (resumed, range(11, 15))):
        for it in its:
            assert curve[it] == pytest.approx(ref[it], rel=PARALLEL_RTOL), (it, curve[it], ref[it])


# The trainer with every background write delayed, so that a save is pending at any moment.
SLOW_WRITES = """
import sys, time
from megatron_sail.checkpoint import dcp
from megatron_sail import cli
from megatron_sail.train import main
original = dcp.HostCopyWriter.write
def slow(self):
    time.sleep(1.0)
    original(self)
dcp.HostCopyWriter.write = slow
cli.run(main, sys.argv[1:])  # exits with main's code, as `python -m megatron_sail.train` does
"""


def test_sigterm_with_a_pending_save_finalizes_and_exits_zero(data, tmp_path):
    ck = tmp_path / "ckpt"
    args = COMMON + [
        "--data-path",
        data["train"],
        "--run-dir",
        str(tmp_path),
        "--init-from",
        data["init"],
        "--save",
        str(ck),
        "--save-interval",
        "1",
        "--async-save",
        "--train-iters",
        "100000",
        "--lr-decay-iters",
        "100000",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITES] + args,
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM" in out
    last = max(losses(tmp_path))
    assert last >= 3 and _latest(ck) == str(last)
    assert _entries(ck) == [f"iter_{last - 1:07d}", f"iter_{last:07d}", "latest"]
    done = [line for line in out.splitlines() if line.startswith("[checkpoint]") and " complete " in line]
    # Saves at every step, and once more at the exit: each one was finalized, in order.
    assert [int(line.split("latest -> ")[1]) for line in done] == list(range(1, last + 1)) + [last]
    assert (ck / f"iter_{last:07d}" / layout.STATE_FILE).exists()
