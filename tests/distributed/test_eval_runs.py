"""Benchmarks end to end on the tiny recipe: --eval-benchmark scores the live model during
training (metrics.jsonl + TensorBoard + predictions), tools/evaluate.py on the saved checkpoint
gives the same predictions and scores, resumes from its response cache, scores an existing
predictions file the same way, and --baseline (the quickstart's check) passes or fails on the
scores."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from megatron_sail.demo.benchmarks import SETS, DemoBenchConfig, write_demo_benchmarks
from testkit import ROOT, make_tiny_demo, subprocess_env

STEPS, LIMIT = 4, 5


def _run(args, expect=0):
    proc = subprocess.run(
        [sys.executable] + args, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == expect, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def _predictions(path) -> dict:
    with open(path, newline="") as f:
        return {r["index"]: r["prediction"] for r in csv.DictReader(f, delimiter="\t")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    data = make_tiny_demo(root / "data", splits=("train",), samples=60)
    bench = write_demo_benchmarks(str(root / "bench"), DemoBenchConfig(items=8, chance_draws=5))
    flags = [a for name in SETS for a in ("--eval-benchmark", f"{name}={bench[name]['path']}")]
    run = root / "run"
    _run(
        [
            "-m",
            "megatron_sail.train",
            "--recipe",
            "tiny",
            "--train-iters",
            str(STEPS),
            "--global-batch-size",
            "2",
            "--micro-batch-size",
            "1",
            "--seq-length",
            "256",
            "--eval-interval",
            "0",
            "--data-path",
            data["train"],
            "--run-dir",
            str(run),
            "--save",
            str(run / "ckpt"),
            *flags,
            "--eval-benchmark-interval",
            "2",
            "--eval-benchmark-at",
            "1",
            "--eval-benchmark-limit",
            str(LIMIT),
        ]
    )
    return {"run": run, "bench": bench, "root": root}


def test_training_logs_benchmark_scores(trained):
    recs = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    bench = [r for r in recs if "benchmarks/pope" in r]
    assert [r["iteration"] for r in bench] == [1, 2, 4]  # --eval-benchmark-at 1, every 2
    steps = {r["iteration"]: r for r in recs if "lm_loss" in r}
    for r in bench:
        assert r["consumed_tokens"] == steps[r["iteration"]]["consumed_tokens"] > 0
        assert set(f"benchmarks/{n}" for n in SETS) <= set(r)
        assert all(r[f"benchmarks_n/{n}"] == LIMIT for n in SETS)
    preds = trained["run"] / "benchmarks" / f"iter_{STEPS:07d}" / "pope_predictions.tsv"
    assert len(_predictions(preds)) == LIMIT
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained["run"] / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("benchmarks/mcq")] == [1, 2, 4]


def test_evaluate_matches_training_resumes_and_rescores(trained):
    bench, out = trained["bench"], trained["root"] / "ev"
    args = [
        "tools/evaluate.py",
        "--checkpoint",
        str(trained["run"] / "ckpt"),
        "--benchmark",
        *[f"{n}={bench[n]['path']}" for n in SETS],
        "--limit",
        str(LIMIT),
        "--out",
        str(out / "results.json"),
    ]
    lines = _run(args).strip().splitlines()[-len(SETS) :]
    scores = {}
    for line, name in zip(lines, SETS):
        m = re.fullmatch(rf"benchmark={name} score=(\S+) n={LIMIT}", line)
        assert m, line
        scores[name] = float(m.group(1))
    final = [
        json.loads(line)
        for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()
        if '"benchmarks/pope"' in line
    ][-1]
    hook_dir = trained["run"] / "benchmarks" / f"iter_{STEPS:07d}"
    for name in SETS:  # same weights, same greedy answers, same scores as the in-training hook
        assert _predictions(out / f"{name}_predictions.tsv") == _predictions(
            hook_dir / f"{name}_predictions.tsv"
        )
        assert scores[name] == pytest.approx(final[f"benchmarks/{name}"], abs=0.01)
    # Interrupted run: keep 2 cached answers of pope, drop its outputs; the rerun generates the
    # 3 missing ones only and writes the same predictions; against an unreachable baseline the
    # quickstart's check fails (exit 1) after writing everything.
    cache = out / "pope_cache.jsonl"
    before = _predictions(out / "pope_predictions.tsv")
    cache.write_text("".join(cache.read_text().splitlines(keepends=True)[:2]))
    os.remove(out / "pope_predictions.tsv")
    unreachable = trained["root"] / "chance_high.json"
    unreachable.write_text(json.dumps({n: {"chance": 1e9} for n in SETS}))
    text = _run(args + ["--baseline", str(unreachable)], expect=1)
    assert text.count("NOT clearly above chance") == len(SETS)
    assert len(cache.read_text().splitlines()) == LIMIT
    assert _predictions(out / "pope_predictions.tsv") == before
    # Score the predictions file alone, with pope's rule.
    last = (
        _run(
            [
                "tools/evaluate.py",
                "--benchmark",
                f"pope={bench['pope']['path']}",
                "--predictions",
                str(out / "pope_predictions.tsv"),
            ]
        )
        .strip()
        .splitlines()[-1]
    )
    assert last == f"benchmark=pope score={scores['pope']:g} n={LIMIT}"


def test_quickstart_benchmark_step(trained):
    """examples/demo_benchmarks.sh, the quickstart's step, on the fixture's checkpoint: a score
    table against the written chance.json, the benchmark= lines, and an exit code that says
    whether every score is clearly above chance (this 4-step model usually is not)."""
    out = trained["root"] / "qs_bench"
    proc = subprocess.run(
        ["bash", "examples/demo_benchmarks.sh", str(trained["run"] / "ckpt"), str(out), "6"],
        cwd=ROOT,
        env=subprocess_env(PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = proc.stdout
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    chance = json.loads((out / "chance.json").read_text())
    for name in SETS:
        row = next(line for line in text.splitlines() if line.startswith(f"[eval] {name} "))
        assert f"chance {chance[name]['chance']:8.2f}" in row
        assert re.search(rf"^benchmark={name} score=\S+ n=6$", text, re.M)
    assert (proc.returncode == 1) == ("NOT clearly above chance" in text)


def test_hook_under_tensor_parallel(trained, tmp_path):
    """--eval-benchmark on a TP=2 run: both ranks generate together (no hang), rank 0 alone
    writes one record per evaluation and the predictions."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bench, run = trained["bench"], tmp_path / "tp2"
    data = str(trained["root"] / "data" / "train")
    flags = [a for name in ("pope", "mcq") for a in ("--eval-benchmark", f"{name}={bench[name]['path']}")]
    _run(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            "-m",
            "megatron_sail.train",
            "--recipe",
            "tiny",
            "--train-iters",
            "2",
            "--global-batch-size",
            "2",
            "--micro-batch-size",
            "1",
            "--seq-length",
            "256",
            "--eval-interval",
            "0",
            "--data-path",
            data,
            "--run-dir",
            str(run),
            "--save",
            str(run / "ckpt"),
            "--tensor-model-parallel-size",
            "2",
            *flags,
            "--eval-benchmark-limit",
            "3",
        ]
    )
    recs = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"benchmarks/pope"' in line
    ]
    assert len(recs) == 1 and recs[0]["iteration"] == 2
    assert recs[0]["benchmarks_n/pope"] == recs[0]["benchmarks_n/mcq"] == 3
    assert len(_predictions(run / "benchmarks" / "iter_0000002" / "mcq_predictions.tsv")) == 3


def test_hook_splits_requests_over_data_parallel_replicas(trained, tmp_path):
    """The fixture's last checkpoint resumed at DP=2 (already at --train-iters: no step, only the
    final evaluation): each replica decodes about half of every set (3 + 2 of 5), and the
    gathered predictions, cache order and scores equal the DP=1 hook's on the same weights."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bench, run = trained["bench"], tmp_path / "dp2"
    data = str(trained["root"] / "data" / "train")
    flags = [a for name in SETS for a in ("--eval-benchmark", f"{name}={bench[name]['path']}")]
    _run(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            "-m",
            "megatron_sail.train",
            "--recipe",
            "tiny",
            "--train-iters",
            str(STEPS),
            "--global-batch-size",
            "2",
            "--micro-batch-size",
            "1",
            "--seq-length",
            "256",
            "--eval-interval",
            "0",
            "--data-path",
            data,
            "--run-dir",
            str(run),
            "--load",
            str(trained["run"] / "ckpt"),
            *flags,
            "--eval-benchmark-limit",
            str(LIMIT),
        ]
    )
    rec = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"benchmarks/pope"' in line
    ]
    single = [
        json.loads(line)
        for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()
        if '"benchmarks/pope"' in line
    ][-1]
    assert len(rec) == 1 and rec[0]["iteration"] == single["iteration"] == STEPS
    hook_dir = trained["run"] / "benchmarks" / f"iter_{STEPS:07d}"
    dp_dir = run / "benchmarks" / f"iter_{STEPS:07d}"
    for name in SETS:
        assert rec[0][f"benchmarks_decoded/{name}"] == [3, 2]
        assert single[f"benchmarks_decoded/{name}"] == [LIMIT]
        assert rec[0][f"benchmarks/{name}"] == single[f"benchmarks/{name}"]
        assert _predictions(dp_dir / f"{name}_predictions.tsv") == _predictions(
            hook_dir / f"{name}_predictions.tsv"
        )
        order = lambda p: [json.loads(line)["index"] for line in p.read_text().splitlines()]  # noqa: E731
        assert order(dp_dir / f"{name}_cache.jsonl") == order(hook_dir / f"{name}_cache.jsonl")
