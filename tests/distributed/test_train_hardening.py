"""Trainer runs (tiny recipe, one CPU rank) against the hardening of issue 12: a new run or a
rollback into an old --save keeps what the user expects (refused unless told, pruned by save
order, `latest` always valid, old metrics kept), a second run on a locked --save and a --save
that is a file fail at start, and a damaged checkpoint or data of another tokenizer is refused
with the file / both values named."""

import json
import os
import shutil
import subprocess

import pytest

from megatron_sail.checkpoint import layout
from megatron_sail.training.save_dir import SaveDirLock
from test_train_runs import COMMON, _cmd, data  # noqa: F401 - `data` is a fixture
from testkit import ROOT, subprocess_env

# Warmup and decay fixed so runs of different lengths share one LR schedule.
BASE = COMMON + ["--lr-warmup-iters", "1", "--lr-decay-iters", "10"]


def run(data, run_dir, extra, expect_rc=0, init=True):
    """One trainer run; returns its output (stdout + stderr)."""
    args = BASE + ["--data-path", data["train"], "--run-dir", str(run_dir)] + list(extra)
    if init:
        args += ["--init-from", data["init"]]
    proc = subprocess.run(
        _cmd(1, args), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect_rc, out[-4000:]
    return out


def lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


@pytest.fixture(scope="module")
def first(data, tmp_path_factory):
    """A 10-step run saving at 5 and 10 into its own --save."""
    d = tmp_path_factory.mktemp("first")
    run(data, d / "run", ["--save", str(d / "ck"), "--save-interval", "5", "--train-iters", "10"])
    return d


def test_new_run_rollback_and_overwrite_into_an_old_save(data, first, tmp_path):
    """(1) A fresh run into the first run's --save is refused. (2) A rollback to iter_5 with
    --keep-last 1 saves 6 and 8 and keeps them: pruning by iteration deleted each at once and
    left `latest` naming a missing folder. The rollback's steps repeat the first run's, and the
    first run's records 6-10 are kept aside, not deleted. (3) --overwrite-save lets a fresh run
    write beside the old checkpoints; its save at 3 survives, the old curve is kept aside."""
    save, run_dir = tmp_path / "ck", tmp_path / "run"
    shutil.copytree(first / "ck", save)
    shutil.copytree(first / "run", run_dir)
    before = {r["iteration"]: r["lm_loss"] for r in lines(run_dir / "metrics.jsonl")}
    assert sorted(before) == list(range(1, 11))

    out = run(data, run_dir, ["--save", str(save), "--train-iters", "3"], expect_rc=2)
    assert "already holds another run's checkpoints (iter_0000005, iter_0000010, latest)" in out
    assert layout.read_latest(str(save)) == 10 and layout.list_checkpoints(str(save)) == [5, 10]

    run(
        data,
        run_dir,
        [
            "--load",
            str(save / "iter_0000005"),
            "--save",
            str(save),
            "--keep-last",
            "1",
            "--save-interval",
            "2",
            "--train-iters",
            "8",
        ],
    )
    assert layout.list_checkpoints(str(save)) == [8] and layout.read_latest(str(save)) == 8
    after = {r["iteration"]: r["lm_loss"] for r in lines(run_dir / "metrics.jsonl")}
    assert sorted(after) == list(range(1, 9))
    for it in range(1, 9):
        assert after[it] == pytest.approx(before[it], rel=1e-6, abs=1e-6), it
    aside = lines(run_dir / "metrics.superseded.jsonl")
    assert [r["iteration"] for r in aside] == [6, 7, 8, 9, 10]

    out = run(data, run_dir, ["--save", str(save), "--overwrite-save", "--train-iters", "3"])
    assert layout.list_checkpoints(str(save)) == [3, 8] and layout.read_latest(str(save)) == 3
    assert [r["iteration"] for r in lines(run_dir / "metrics.jsonl")] == [1, 2, 3]
    aside = [r["iteration"] for r in lines(run_dir / "metrics.superseded.jsonl")]
    assert aside == [6, 7, 8, 9, 10] + list(range(1, 9))
    assert "moved to metrics.superseded.jsonl" in out


def test_locked_save_and_save_that_is_a_file_fail_at_start(data, tmp_path):
    save = tmp_path / "ck"
    save.mkdir()
    lock = SaveDirLock(str(save))
    assert lock.acquire() is None
    try:
        out = run(data, tmp_path / "run", ["--save", str(save)], expect_rc=2)
    finally:
        lock.release()
    assert f"--save {save} is in use by another run (host" in out and f"pid {os.getpid()}" in out
    (tmp_path / "file").write_text("not a folder")
    out = run(data, tmp_path / "run", ["--save", str(tmp_path / "file")], expect_rc=2)
    assert "is a file, not a folder" in out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before training


def _flip(path, offset=4096, count=4096):
    blob = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_damaged_checkpoint_is_refused_naming_the_file(data, first, tmp_path):
    damaged = tmp_path / "ck"
    shutil.copytree(first / "ck" / "iter_0000010", damaged)
    _flip(damaged / "__0_0.distcp")
    out = run(
        data, tmp_path / "run", ["--load", str(damaged), "--train-iters", "10"], expect_rc=2, init=False
    )
    assert f"{damaged}/__0_0.distcp: contents changed since it was saved" in out


def test_data_of_another_tokenizer_is_refused_with_both_identities(data, first, tmp_path):
    """Same rows, but meta.json says another tokenizer made them: resume refused with both
    identities; --allow-tokenizer-mismatch loads it (a warning) and, the checkpoint being at
    --train-iters already, says there is nothing to train and does not rewrite it although
    --save names its folder (it used to be saved again)."""
    prefix = tmp_path / "other"
    for f in os.listdir(os.path.dirname(data["train"])):
        if f.startswith("train."):
            shutil.copy(os.path.join(os.path.dirname(data["train"]), f), str(prefix) + f[len("train") :])
    meta = json.loads((tmp_path / "other.meta.json").read_text())
    mine = meta["tokenizer"]["identity"]
    assert mine.startswith("sha256:")
    meta["tokenizer"]["identity"] = "sha256:0123456789abcdef"
    (tmp_path / "other.meta.json").write_text(json.dumps(meta))
    load = ["--data-path", str(prefix), "--load", str(first / "ck"), "--train-iters", "10"]
    out = run(data, tmp_path / "run", load, expect_rc=2, init=False)
    assert f"identity: '{mine}' (checkpoint) vs 'sha256:0123456789abcdef' (data)" in out
    stamp = os.path.getmtime(first / "ck" / "iter_0000010" / "manifest.json")
    out = run(
        data, tmp_path / "run", load + ["--allow-tokenizer-mismatch", "--save", str(first / "ck")], init=False
    )
    assert "WARNING (--allow-tokenizer-mismatch)" in out
    assert "at iteration 10 = --train-iters: nothing to train" in out
    assert os.path.getmtime(first / "ck" / "iter_0000010" / "manifest.json") == stamp
