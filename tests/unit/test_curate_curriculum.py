"""Curricula from complexity scores (megatron_sail/curate/curriculum.py, tools/build_curriculum.py)
and preprocessing's --select of one stage (megatron_sail/data/preprocess/selection.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_sail.curate.curriculum import (
    CurriculumConfig,
    PlanPaths,
    build_plan,
    ordered_stages,
    stage_iters,
)
from testkit import ROOT, subprocess_env


def _records(n=12):
    # scores 0..n-1 given out of order, one tie
    scores = [5, 1, 9, 0, 3, 11, 7, 2, 10, 4, 8, 6][:n]
    return [{"source": "/d/a.jsonl", "key": f"line {i + 1}", "score": float(s)} for i, s in enumerate(scores)]


def _scores(stages):
    return [[r["score"] for r in s] for s in stages]


def test_split_orders_and_replay(tmp_path):
    recs = _records()
    asc = ordered_stages(recs, CurriculumConfig(3))
    assert _scores(asc) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert _scores(ordered_stages(recs, CurriculumConfig(3, order="descending"))) == _scores(asc)[::-1]
    thr = ordered_stages(recs, CurriculumConfig(3, "thresholds", (2.0, 9.5)))
    assert _scores(thr) == [[0, 1], [2, 3, 4, 5, 6, 7, 8, 9], [10, 11]]
    shuf = ordered_stages(recs, CurriculumConfig(3, order="shuffled", seed=3))
    assert [len(s) for s in shuf] == [4, 4, 4] and sorted(sum(_scores(shuf), [])) == list(range(12))
    assert _scores(shuf) != _scores(asc)
    one = ordered_stages(recs, CurriculumConfig(1, order="shuffled"))
    assert len(one) == 1 and sorted(_scores(one)[0]) == list(range(12))
    with pytest.raises(ValueError, match="2 increasing thresholds"):
        CurriculumConfig(3, "thresholds", (3.0, 1.0))

    plan = build_plan(
        recs,
        CurriculumConfig(3, mix_previous=0.5, total_iters=100),
        PlanPaths(str(tmp_path / "lists"), str(tmp_path / "packed"), ["/d/a.jsonl"], "--seq-length 256"),
    )
    s1, s2, s3 = plan["stages"]
    assert (s1["replayed"], s2["replayed"], s3["replayed"]) == (0, 2, 2)
    rep = [json.loads(line) for line in Path(s3["lists"]["replay"]).read_text().splitlines()]
    assert all(r["score"] < 8 for r in rep)  # replayed from stages 1-2 only
    assert s2["blend"] == f"0.666667 {tmp_path}/packed/stage2 0.333333 {tmp_path}/packed/stage2_replay"
    assert [s["iters"] for s in plan["stages"]] == stage_iters(plan, 100) and sum(
        stage_iters(plan, 100)
    ) == 100
    assert [c["init_from"] for c in plan["chain"]] == ["INIT_FROM", "stage1", "stage2"]
    assert [s["trainer_stage"] for s in plan["stages"]] == [
        "sft-knowledge",
        "sft-instruction",
        "sft-preference",
    ]
    assert "--select " + s2["lists"]["new"] in s2["preprocess"][0] and s2["preprocess"][0].endswith(
        "--seq-length 256"
    )
    with pytest.raises(ValueError, match="stage3 hold no sample"):
        build_plan(recs, CurriculumConfig(3, "thresholds", (1.0, 50.0)), PlanPaths(str(tmp_path / "l2"), "p"))


def test_tool_plan_then_preprocess_one_stage(tmp_path):
    """score_complexity (heuristic) -> build_curriculum -> the plan's preprocess command for a
    stage packs exactly that stage's samples."""
    from megatron_sail.demo.generator import DemoConfig, make_demo

    demo = make_demo(str(tmp_path / "demo"), DemoConfig(samples=24, val_samples=2, seed=4))

    def run(*a):
        return subprocess.run(
            [sys.executable, *a], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
        )

    r = run(
        "tools/score_complexity.py",
        "--input",
        demo["train"],
        "--method",
        "heuristic",
        "--output-dir",
        str(tmp_path / "scores"),
        "--samples-per-shard",
        "10",
    )
    assert r.returncode == 0, r.stderr
    r = run(
        "tools/build_curriculum.py",
        "--scores",
        str(tmp_path / "scores"),
        "--stages",
        "3",
        "--output",
        str(tmp_path / "plan.yaml"),
        "--python",
        sys.executable,
        "--preprocess-flags",
        f"--tokenizer {demo['tokenizer']} --seq-length 256 --recipe tiny --max-tiles 4",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("stage1 (sft-knowledge): 8 samples + 0 replayed")
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert plan["curriculum"]["method"] == "heuristic"
    stage = plan["stages"][2]
    p = subprocess.run(
        stage["preprocess"][0],
        shell=True,
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["select"] == {"kept": 8, "skipped": 16} and summary["samples"] == 8
    r = run(
        "tools/preprocess_data.py",
        "--input",
        demo["train"],
        "--tokenizer",
        demo["tokenizer"],
        "--seq-length",
        "256",
        "--output-prefix",
        str(tmp_path / "x"),
        "--select-min-score",
        "2",
    )
    assert r.returncode == 2 and "need --select" in r.stderr
