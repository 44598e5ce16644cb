"""Training runs of the paper-claims study: each run is the trainer's own CLI in a subprocess
(a clean process per run, as tools/data_ablation.py does), its log in the run dir, and a
``done.json`` mark, so that a rerun of the study skips every finished run. Scores come from the
trainer's in-training benchmark hook (``--eval-benchmark``): metrics.jsonl and the predictions
under ``<run>/benchmarks/iter_N/``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class RunSpec:
    """One training run."""

    run_dir: str
    """Its folder (checkpoints, metrics.jsonl, train.log, done.json)."""
    data_path: str
    """The --data-path blend."""
    iters: int
    """Steps."""
    seed: int = 1234
    """Training seed."""
    init_from: Optional[str] = None
    """Checkpoint the weights start from (None: random init)."""
    benchmarks: dict = field(default_factory=dict)
    """NAME -> TSV scored during training (at the end, and at ``eval_at`` steps)."""
    eval_at: list = field(default_factory=list)
    """Steps of the extra in-training evaluations."""
    extra: list = field(default_factory=list)
    """More trainer flags."""


def train(spec: RunSpec, python: str = sys.executable, log: Callable[[str], None] = print) -> dict:
    """Run it (or keep it when done.json exists); returns done.json's content."""
    done = os.path.join(spec.run_dir, "done.json")
    if os.path.isfile(done):
        with open(done) as f:
            info = json.load(f)
        _check_same_run(done, info, spec)
        return info
    if os.path.isdir(spec.run_dir):  # a run that stopped before finishing: start it over
        shutil.rmtree(spec.run_dir)
    os.makedirs(spec.run_dir)
    cmd = [
        python,
        "-m",
        "megatron_sail.train",
        "--recipe",
        "tiny",
        "--stage",
        "sft-knowledge",
        "--seq-length",
        "256",
        "--data-path",
        *spec.data_path.split(),
        "--train-iters",
        str(spec.iters),
        "--seed",
        str(spec.seed),
        "--eval-interval",
        "0",
        "--log-interval",
        "50",
        "--run-dir",
        spec.run_dir,
        "--save",
        os.path.join(spec.run_dir, "checkpoints"),
    ]
    if spec.init_from:
        cmd += ["--init-from", spec.init_from]
    for name, path in spec.benchmarks.items():
        cmd += ["--eval-benchmark", f"{name}={path}"]
    if spec.eval_at:
        cmd += ["--eval-benchmark-at", *[str(i) for i in spec.eval_at]]
    cmd += list(spec.extra)
    t0 = time.perf_counter()
    with open(os.path.join(spec.run_dir, "train.log"), "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        with open(os.path.join(spec.run_dir, "train.log")) as f:
            tail = f.read()[-2500:]
        raise RuntimeError(f"training run {spec.run_dir} failed (exit {rc}):\n{tail}")
    info = {
        "iters": spec.iters,
        "seed": spec.seed,
        "data_path": spec.data_path,
        "init_from": spec.init_from,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(cmd),
    }
    with open(done + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
    os.replace(done + ".tmp", done)
    log(f"[study] {spec.run_dir}: {spec.iters} steps in {info['seconds']} s")
    return info


def _check_same_run(done: str, info: dict, spec: RunSpec) -> None:
    """A finished run is kept only if it is the run asked for: a study resumed with other sizes
    (steps, seed, data, start) must not report the old run under the new settings."""
    want = {"iters": spec.iters, "seed": spec.seed, "data_path": spec.data_path, "init_from": spec.init_from}
    diff = [f"{k} {info.get(k)!r} (now {v!r})" for k, v in want.items() if info.get(k) != v]
    if diff:
        raise ValueError(
            f"{done}: this finished run was made with other settings: {', '.join(diff)}; "
            "use another --out or delete the folder"
        )


def train_chain(stages: list[RunSpec], python: str = sys.executable, log=print) -> str:
    """Stages in order, each from the previous stage's weights; returns the last run dir."""
    prev = stages[0].init_from
    for spec in stages:
        spec.init_from = prev
        train(spec, python, log)
        prev = os.path.join(spec.run_dir, "checkpoints")
    return stages[-1].run_dir


def final_scores(run_dir: str) -> dict:
    """{benchmark: score} of the run's last benchmark record."""
    last = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if any(k.startswith("benchmarks/") for k in rec):
                last = rec
    return {k[len("benchmarks/") :]: v for k, v in last.items() if k.startswith("benchmarks/")}


def final_predictions(run_dir: str, names) -> dict:
    """{benchmark: predictions TSV} of the run's last evaluation."""
    base = os.path.join(run_dir, "benchmarks")
    last = sorted(d for d in os.listdir(base) if d.startswith("iter_"))[-1]
    return {n: os.path.join(base, last, f"{n}_predictions.tsv") for n in names}
