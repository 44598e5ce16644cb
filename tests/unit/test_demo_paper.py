"""The paper-claims study's pieces (examples/reproduce_paper.sh runs the whole study; it is an
example, not a test): graded demo questions have the answers their scenes determine, the level
sets are VLMEvalKit TSVs the evaluator reads, and the report's curriculum numbers and paired
bootstrap come out of stored predictions as computed by hand."""

from __future__ import annotations

import json
import math
import random
import re

import pytest

from megatron_sail.curate.ablation_stats import BootstrapConfig
from megatron_sail.demo import graded
from megatron_sail.demo.generator import NUMBERS
from megatron_sail.demo.paper_report import LevelScorer, curriculum, spearman
from megatron_sail.demo.paper_study import geometric_steps, split_steps


def _truth(q: str, objs: list[dict]) -> str:
    """The answer recomputed from the objects by reading the question."""
    name = lambda o: f"{o['colour']} {o['shape']}"  # noqa: E731
    if q == "What colour is the shape?":
        return objs[0]["colour"]
    if q == "What shape is shown?":
        return objs[0]["shape"]
    if m := re.fullmatch(r"What colour is the shape left of the (\w+)\?", q):
        i = [o["shape"] for o in objs].index(m[1])
        return objs[i - 1]["colour"]
    if m := re.fullmatch(r"What shape is right of the (\w+ \w+)\?", q):
        return objs[[name(o) for o in objs].index(m[1]) + 1]["shape"]
    if m := re.fullmatch(r"Is the (\w+ \w+) left of the (\w+ \w+)\?", q):
        names = [name(o) for o in objs]
        return "yes" if names.index(m[1]) < names.index(m[2]) else "no"
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
        return NUMBERS[sum(o["colour"] == m[1] for o in objs)]
    if m := re.fullmatch(r"How many (\w+)s are there\?", q):
        return NUMBERS[sum(o["shape"] == m[1] for o in objs)]
    m = re.fullmatch(r"How many shapes are left of the (\w+ \w+)\?", q)
    return NUMBERS[[name(o) for o in objs].index(m[1])]


def test_graded_answers_follow_from_the_scene():
    rng = random.Random(0)
    kinds = set()
    for level in graded.LEVELS:
        for _ in range(300):
            objs = graded._objects(rng, level)
            assert len(objs) == level and [o["slot"] for o in objs] == sorted({o["slot"] for o in objs})
            q, a, kind = graded.question(rng, level, objs)
            assert a == _truth(q, objs), (level, q, objs)
            kinds.add(kind)
    assert kinds == {
        "colour",
        "shape",
        "colour_of_left",
        "shape_of_right",
        "is_left",
        "count_colour",
        "count_shape",
        "count_left",
    }


def test_level_sets_and_pool(tmp_path):
    from megatron_sail.eval.tsv import read_items

    info = graded.write_level_benchmarks(str(tmp_path / "b"), graded.GradedConfig(bench_items=12, seed=3))
    assert list(info) == ["vqa@level1", "vqa@level2", "vqa@level3"]
    for v in info.values():
        items = read_items(v["path"])
        assert len(items) == 12 and all(len(it.images) == 1 for it in items)
        assert 0 < v["chance"] < 100
    pool = graded.write_pool(str(tmp_path / "p"), graded.GradedConfig(samples_per_level=5, seed=3))
    rows = [json.loads(line) for line in open(pool["path"])]
    assert sorted(r["level"] for r in rows) == [1] * 5 + [2] * 5 + [3] * 5
    assert rows[0]["conversations"][0]["value"].endswith(
        "\nAnswer the question using a single word or phrase."
    )


def _fake_run(root, name: str, bench: dict, answers: dict) -> str:
    """A run dir with one final evaluation whose predictions are ``answers[bench][i]``."""
    from megatron_sail.eval.tsv import read_items, write_predictions

    d = root / name / "benchmarks" / "iter_0000010"
    d.mkdir(parents=True)
    for b, path in bench.items():
        items = read_items(path)
        write_predictions(
            str(d / f"{b}_predictions.tsv"),
            ["index", "question", "answer", "category"],
            items,
            {it.index: answers[b][k] for k, it in enumerate(items)},
        )
    return str(root / name)


def test_curriculum_numbers_and_bootstrap_from_predictions(tmp_path):
    from megatron_sail.eval.tsv import read_items

    info = graded.write_level_benchmarks(str(tmp_path / "b"), graded.GradedConfig(bench_items=10, seed=5))
    bench = {k: v["path"] for k, v in info.items()}
    truth = {b: [it.get("answer") for it in read_items(p)] for b, p in bench.items()}

    def right(b, k):  # the first k items right, the rest wrong
        return [a if i < k else "wrong" for i, a in enumerate(truth[b])]

    arms = {
        "one_stage": [
            _fake_run(tmp_path, "o1", bench, {b: right(b, 5) for b in bench}),
            _fake_run(tmp_path, "o2", bench, {b: right(b, 3) for b in bench}),
        ],
        "ascending": [
            _fake_run(tmp_path, "a1", bench, {b: right(b, 9) for b in bench}),
            _fake_run(tmp_path, "a2", bench, {b: right(b, 7) for b in bench}),
        ],
    }
    out = curriculum(arms, LevelScorer(bench), str(tmp_path / "c.png"), BootstrapConfig(300, 0.95, 0))
    assert out["mean"] == pytest.approx({"one_stage": 40.0, "ascending": 80.0})
    assert out["per_seed"]["ascending"] == pytest.approx([90.0, 70.0])
    d = out["diff_vs_one_stage"]["ascending"]
    assert d["diff"] == pytest.approx(40.0) and 0 < d["ci_low"] <= 40.0 <= d["ci_high"] <= 100
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_study_step_helpers():
    assert geometric_steps(512, 6) == [16, 32, 64, 128, 256]  # + the final step: 6 points, 1.5 decades
    assert split_steps(11, [20, 30, 30]) == [3, 4, 4] and sum(split_steps(100, [1, 1, 1])) == 100
    assert spearman([1, 2, 3, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)


def test_caption_claim_from_a_sail_caption_summary(tmp_path):
    from megatron_sail.demo.paper_report import caption

    assert caption(None, str(tmp_path / "c.png")) is None
    summary = tmp_path / "summary.json"
    summary.write_text(
        json.dumps(
            {
                "caption_word_f1": {"recaptioned": 66.7, "original": 53.9},
                "gain": 12.8,
                "gain_ci95": [9.4, 16.6],
                "items": 100,
            }
        )
    )
    out = caption(str(summary), str(tmp_path / "c.png"))
    assert out["gain"] == 12.8 and out["gain_ci95"] == [9.4, 16.6] and out["source"] == str(summary)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_report_json_keys_and_markdown_from_fake_runs(tmp_path):
    """report.json's required keys (scaling a/b/r2 per benchmark and average, sft_quantity,
    curriculum with the CI of ascending minus one-stage) and report.md, from runs whose scores
    are known: a pretraining run with pope = 10 + 5 ln(tokens) and a flat mcq, quantity runs
    with 2/6/10 of 10 items right, arms with 8 (ascending), 4 (one stage) and 0 (descending)."""
    from megatron_sail.demo.paper_markdown import write_markdown
    from megatron_sail.demo.paper_report import quantity, scaling
    from megatron_sail.demo.paper_study import StudyConfig, assemble
    from megatron_sail.eval.tsv import read_items

    info = graded.write_level_benchmarks(str(tmp_path / "b"), graded.GradedConfig(bench_items=10, seed=7))
    bench = {k: v["path"] for k, v in info.items()}
    truth = {b: [it.get("answer") for it in read_items(p)] for b, p in bench.items()}

    def run(name, k):
        return _fake_run(
            tmp_path, name, bench, {b: [a if i < k else "-" for i, a in enumerate(truth[b])] for b in bench}
        )

    pre = tmp_path / "pretrain"
    pre.mkdir()
    toks = [1e3 * 2**i for i in range(6)]
    pre.joinpath("metrics.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "iteration": i,
                    "consumed_tokens": t,
                    "benchmarks/pope": 10 + 5 * math.log(t),
                    "benchmarks/mcq": 30.0,
                }
            )
            + "\n"
            for i, t in enumerate(toks)
        )
    )
    sc = scaling([str(pre)], 10 * toks[-1], str(tmp_path / "s.png"))
    quant = quantity(
        {30: run("q30", 2), 90: run("q90", 6), 10: run("q10", 10)},
        LevelScorer(bench),
        str(tmp_path / "q.png"),
    )
    arms = {"one_stage": [run("o", 4)], "ascending": [run("a", 8)], "descending": [run("d", 0)]}
    cur = curriculum(arms, LevelScorer(bench), str(tmp_path / "c.png"), BootstrapConfig(200, 0.95, 0))
    stages = [
        {
            "name": f"stage{k}",
            "score_min": k,
            "score_max": k + 0.5,
            "samples": 5,
            "levels": {"1": 5, "2": 0, "3": 0},
        }
        for k in (1, 2, 3)
    ]
    data = {
        "pretrain_chance": {"pope": 50.0, "mcq": 25.0},
        "level_chance": {b: v["chance"] for b, v in info.items()},
    }
    cfg = StudyConfig(out=str(tmp_path))
    timing = {"total": 1.0, "data": 1.0, "runs_recorded": {"sft": 2.0}}
    r = assemble(
        cfg,
        data,
        {"rows": 3},
        sc,
        quant,
        cur,
        None,
        {"stages": stages, "replay_stages": [dict(st, replayed=k) for k, st in enumerate(stages)]},
        {"total": 6, "per_stage": [2, 2, 2], "replay_per_stage": [1, 2, 3]},
        0.5,
        1e5,
        timing,
    )
    assert r["scaling"]["pope"]["a"] == pytest.approx(10.0) and r["scaling"]["pope"]["b"] == pytest.approx(
        5.0
    )
    assert r["scaling"]["pope"]["r2"] == pytest.approx(1.0) and r["scaling"]["mcq"]["r2"] is None
    assert r["scaling"]["average"]["b"] == pytest.approx(2.5) and r["scaling"]["average"]["points"] == 6
    assert r["sft_quantity"] == pytest.approx({"10": 100.0, "30": 20.0, "90": 60.0})
    assert list(r["sft_quantity"]) == ["10", "30", "90"]
    c = r["curriculum"]
    assert (c["one_stage"], c["ascending"], c["descending"]) == pytest.approx((40.0, 80.0, 0.0))
    up, down = c["ascending_minus_one_stage"], c["descending_minus_one_stage"]
    assert up["diff"] == pytest.approx(40.0) and 0 < up["ci_low"] <= 40.0 <= up["ci_high"]
    assert down["diff"] == pytest.approx(-40.0) and down["ci_high"] < 0
    md_path = tmp_path / "report.md"
    write_markdown(str(md_path), r)
    md = md_path.read_text()
    assert (
        f"- ascending minus one-stage: +40.00 points, 95% CI [{up['ci_low']:+.2f}, {up['ci_high']:+.2f}]: better"
        in md
    )
    assert "- descending minus one-stage: -40.00 points" in md and "worse (the interval excludes 0)" in md
    assert "| pope | 10.00 | 5.000 | 1.000 | 6 |" in md and "| mcq | 30.00 | 0.000 | n/a | 6 |" in md
    assert (
        "the training runs took, when they ran (their done.json, kept when a rerun resumes): sft 2.0 s" in md
    )
    assert "## (d) Recaptioned data against the original text\n\nNot run here" in md
    assert (
        "`ascending_replay`: the same ascending stages, stage k > 1 also replaying 0.5 x its size of "
        "random samples of the earlier stages (tools/build_curriculum.py --mix-previous), the same steps "
        "in total: stage1 5 + 0 replayed, 1 steps; stage2 5 + 1 replayed, 2 steps; stage3 5 + 2 replayed, "
        "3 steps." in md.replace("\n", " ")
    )
    assert r["details"]["replay_stages"][2]["replayed"] == 2


def test_resumed_study_keeps_only_the_same_runs(tmp_path):
    """A finished run (done.json) is kept when the spec is the same and refused, naming the
    difference, when the study is resumed with other steps; the data likewise."""
    from megatron_sail.demo.paper_data import StudyData, make_data
    from megatron_sail.demo.paper_runs import RunSpec, train

    spec = RunSpec(str(tmp_path / "r"), "/p/data", 6, seed=2, init_from="/ckpt")
    (tmp_path / "r").mkdir()
    info = {"iters": 6, "seed": 2, "data_path": "/p/data", "init_from": "/ckpt", "seconds": 1.5}
    (tmp_path / "r" / "done.json").write_text(json.dumps(info))
    assert train(spec, python="/nonexistent/python") == info  # kept: nothing runs
    spec.iters = 12
    with pytest.raises(ValueError, match=r"done.json: .*other settings: iters 6 \(now 12\)"):
        train(spec, python="/nonexistent/python")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "done.json").write_text(json.dumps({"config": {"pretrain_samples": 1}}))
    with pytest.raises(ValueError, match="made with other sizes"):
        make_data(str(tmp_path), StudyData())
