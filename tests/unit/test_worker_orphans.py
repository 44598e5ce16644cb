"""kill -9 of a run with --workers 2 takes its workers with it (issue 20 item 5): preprocess_data's
block workers and recaption's shard workers are gone within seconds, checked by their pids, and
no recaption worker commits a shard after its parent died."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from recaption_fixtures import FakeVLMServer, write_shards
from testkit import ROOT as REPO
from testkit import subprocess_env


def children(pid: int) -> dict[int, str]:
    """Live (non-zombie) processes whose parent is ``pid``: {pid: command line}."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out[int(entry)] = cmd
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids, timeout: float = 15.0) -> list[int]:
    """The pids still alive after polling up to ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def kill_all(pids) -> None:
    """Leave nothing behind when the test fails (the workers it found outlived their parent)."""
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(cond, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_preprocess_workers_exit_when_the_parent_is_killed(tmp_path):
    from megatron_sail.demo.generator import DemoConfig, make_demo

    demo = make_demo(str(tmp_path / "demo"), DemoConfig(samples=24, val_samples=2, seed=3))
    # the real tool, whose input stalls after two blocks: the workers are up and idle, the parent waits
    script = textwrap.dedent(f"""
        import itertools, sys, time
        import megatron_sail.data.preprocess.pipeline as pp
        real = pp.iter_blocks
        def stalled(*a, **k):
            yield from itertools.islice(real(*a, **k), 2)
            open({str(tmp_path / "stalled")!r}, 'w').close()
            time.sleep(600)
        pp.iter_blocks = stalled
        import preprocess_data
        preprocess_data.main(sys.argv[1:])
    """)
    argv = [
        "--input",
        demo["train"],
        "--output-prefix",
        str(tmp_path / "out" / "train"),
        "--tokenizer",
        demo["tokenizer"],
        "--seq-length",
        "256",
        "--packing-buffer",
        "6",
        "--workers",
        "2",
        "--tile-size",
        "32",
        "--tokens-per-tile",
        "4",
        "--max-tiles",
        "4",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
    )
    workers: list[int] = []
    try:
        wait_for(lambda: (tmp_path / "stalled").exists() or proc.poll() is not None)
        wait_for(lambda: len(children(proc.pid)) >= 2 or proc.poll() is not None)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        workers = list(children(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_gone(workers) == [], f"workers {workers} outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(workers)
    assert not (tmp_path / "out" / "train.meta.json").exists()


def test_recaption_workers_exit_and_commit_nothing_after_the_parent_is_killed(tmp_path):
    write_shards(tmp_path / "in", 6, 3, seed=2)
    out = tmp_path / "out"
    with FakeVLMServer(delay_s=0.25) as server:
        cmd = [
            sys.executable,
            str(REPO / "tools" / "recaption.py"),
            "--input",
            str(tmp_path / "in" / "*.tar"),
            "--output-dir",
            str(out),
            "--model",
            "fake-vlm",
            "--backend",
            "openai",
            "--api-base",
            server.url,
            "--batch-size",
            "1",
            "--max-new-tokens",
            "16",
            "--workers",
            "2",
            "--no-progress",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env())
        workers: list[int] = []
        try:
            wait_for(lambda: server.calls >= 2 or proc.poll() is not None)
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            workers = [p for p, cmd in children(proc.pid).items() if "resource_tracker" not in cmd]
            assert len(workers) == 2, children(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            done_at_kill = (
                sorted(p.name for p in (out / "done").glob("*.json")) if (out / "done").exists() else []
            )
            proc.wait()
            assert wait_gone(workers) == [], f"workers {workers} outlived their parent"
            time.sleep(1.0)  # a surviving worker would finish its shard (3 x 0.25 s) and commit it
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            kill_all(workers)
    done_after = sorted(p.name for p in (out / "done").glob("*.json")) if (out / "done").exists() else []
    assert done_after == done_at_kill and len(done_after) < 6
    assert sorted(p.stem for p in out.glob("*.tar")) == [n[:-5] for n in done_after]
