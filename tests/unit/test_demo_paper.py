"""The paper-claims study's pieces (examples/reproduce_paper.sh runs the whole study; it is an
example, not a test): graded demo questions have the answers their scenes determine, the level
sets are VLMEvalKit TSVs the evaluator reads, and the report's curriculum numbers and paired
bootstrap come out of stored predictions as computed by hand."""

from __future__ import annotations

import json
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
