"""Preprocessing on a full disk (issue 20 item 6): ENOSPC injected at the output's write call
(and again at close, as a buffered tail does) ends in one line naming the file, leaves no
temporaries, and a later run removes stale ``*.tmp<PID>`` files of its prefix whose PID is dead."""

from __future__ import annotations

import errno
import importlib
import os
import subprocess
import sys

import pytest

from megatron_sail.data import integrity


def tool(name):
    """A tool's module (tools/ is on the import path)."""
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megatron_sail.demo.generator import DemoConfig, make_demo

    return make_demo(str(tmp_path_factory.mktemp("demo")), DemoConfig(samples=40, val_samples=2, seed=5))


def argv(demo, prefix) -> list[str]:
    return [
        "--input",
        demo["train"],
        "--output-prefix",
        str(prefix),
        "--tokenizer",
        demo["tokenizer"],
        "--seq-length",
        "256",
        "--packing-buffer",
        "8",
        "--tile-size",
        "32",
        "--tokens-per-tile",
        "4",
        "--max-tiles",
        "4",
    ]


class FullDisk:
    """A file whose device fills after ``budget`` bytes: write raises ENOSPC, and so does close
    (the buffered tail cannot be flushed either)."""

    def __init__(self, f, budget: int):
        self.f, self.budget, self.full = f, budget, False

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.budget:
            self.full = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= n
        return self.f.write(data)

    def close(self) -> None:
        self.f.close()
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_enospc_gives_one_line_naming_the_file_and_leaves_no_temporaries(demo, tmp_path, monkeypatch, capsys):
    real_init = integrity.HashingFile.__init__

    def init(self, f):
        real_init(self, FullDisk(f, 3000) if f.name.endswith(".tokens.bin" + f".tmp{os.getpid()}") else f)

    monkeypatch.setattr(integrity.HashingFile, "__init__", init)
    prefix = tmp_path / "out" / "train"
    code = tool("preprocess_data").main(argv(demo, prefix))
    stderr = capsys.readouterr().err
    err = [ln for ln in stderr.splitlines() if ln.startswith("error")]  # (megatron's import warnings aside)
    assert code == 4 and "Traceback" not in stderr
    assert len(err) == 1 and err[0].startswith("error: no space left on device while writing "), stderr
    assert f"{prefix}.tokens.bin.tmp{os.getpid()}" in err[0] and "bytes free)" in err[0]
    assert os.listdir(tmp_path / "out") == [], "temporaries left on the full disk"


def test_a_rerun_removes_stale_temporaries_of_dead_processes(demo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = [out / f"train.tokens.bin.tmp{dead}", out / f"train.rejects.jsonl.tmp{dead}"]
        kept = [out / f"train.images.bin.tmp{live.pid}", out / f"other.tokens.bin.tmp{dead}"]
        for p in stale + kept:
            p.write_bytes(b"x" * 100)
        assert tool("preprocess_data").main(argv(demo, out / "train")) == 0
        capsys.readouterr()
        assert not any(p.exists() for p in stale)
        assert all(p.exists() for p in kept), "a live writer's or another prefix's files were removed"
        assert (out / "train.meta.json").exists()
    finally:
        live.kill()
        live.wait()
