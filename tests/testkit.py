"""Plumbing the tests share: where the checkout is, the environment of a subprocess that
imports this checkout, and the tiny demo data set and tokenizer.

pytest puts the checkout, tools/, benchmarks/, tests/, tests/unit and tests/distributed on
``sys.path`` (pyproject's ``pythonpath``), so tests import this module and the tools by name.
Subprocesses do not inherit ``sys.path``: they get it through ``PYTHONPATH`` from
``subprocess_env``. tests/conftest.py offers the same things as fixtures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_path() -> list[str]:
    """pytest's ``pythonpath`` from pyproject.toml, as absolute folders (one list for both)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        entries = tomllib.load(f)["tool"]["pytest"]["ini_options"]["pythonpath"]
    return [str((ROOT / e).resolve()) for e in entries]


IMPORT_PATH = _import_path()


LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)
"""torchrun's variables: a child started by a test is a lone process unless the test says otherwise."""


def subprocess_env(**extra) -> dict:
    """The environment of a child Python: it imports this checkout (not whatever the editable
    install points at), the tools and the test helpers by name, as the tests do; one thread per
    process (the CPU is shared) and quiet about warnings; no launcher variables (a rank or world
    size in the test process is not the child's). ``extra`` sets or overrides variables."""
    return dict(
        {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES},
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(IMPORT_PATH),
        PYTHONWARNINGS="ignore",
        **{k: str(v) for k, v in extra.items()},
    )


def make_tiny_demo(
    out: Path, *, env: dict | None = None, splits=("train", "val"), samples: int = 120
) -> dict:
    """The small demo set the trainer tests run on, written under ``out``: generated, then
    preprocessed to the tiny recipe's geometry (32 px tiles, 4 tokens per tile, at most 4
    tiles, 256-token rows). Returns {split: dataset prefix}."""
    env = env or subprocess_env()
    py = [sys.executable, "-W", "ignore"]
    subprocess.run(
        py + ["tools/make_demo_data.py", "--out", str(out / "raw"), "--samples", str(samples)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    prefixes = {}
    for split in splits:
        prefixes[split] = str(out / split)
        subprocess.run(
            py
            + [
                "tools/preprocess_data.py",
                "--input",
                str(out / "raw" / f"{split}.jsonl"),
                "--tokenizer",
                str(out / "raw" / "tokenizer.json"),
                "--output-prefix",
                prefixes[split],
                "--seq-length",
                "256",
                "--recipe",
                "tiny",
                "--max-tiles",
                "4",
            ],  # 32 px tiles, 4 tokens
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
    return prefixes


def make_tiny_tokenizer(out: Path) -> str:
    """The demo generator's small BPE tokenizer (with the chat template's special tokens),
    written under ``out``; returns its tokenizer.json path."""
    from megatron_sail.demo.generator import DemoConfig, make_demo

    return make_demo(str(out), DemoConfig(samples=8, val_samples=2, seed=1))["tokenizer"]
