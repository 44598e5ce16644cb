"""The data-quality loop's statistics on synthetic per-item results (paired bootstrap,
ranking, table, PNG), the token budget -> steps rule, and the caption scorer."""

from __future__ import annotations

import random

import pytest

from megatron_sail.curate.ablation import AblationConfig, compare, train_iters
from megatron_sail.curate.ablation_stats import (
    BootstrapConfig,
    format_table,
    paired_bootstrap,
    plot_ranking,
    rank,
)
from megatron_sail.eval.registry import get_benchmark
from megatron_sail.eval.score_caption import word_f1
from megatron_sail.eval.tsv import Item, write_tsv


def synthetic(n: int, acc: dict[str, float], seed: int = 0) -> dict[str, list[int]]:
    """Per-item correctness of candidates with the given true accuracies (shared item difficulty,
    as on a real benchmark, so the paired difference is less noisy than each score)."""
    rng = random.Random(seed)
    difficulty = [rng.random() for _ in range(n)]
    return {c: [int(d < a) for d in difficulty] for c, a in acc.items()}


def test_paired_bootstrap_covers_the_difference():
    hits = synthetic(400, {"good": 0.7, "bad": 0.5, "same": 0.7})
    idx = list(range(400))

    def diff(a, b):
        return lambda s: 100 * (sum(hits[a][i] for i in s) - sum(hits[b][i] for i in s)) / len(s)

    cfg = BootstrapConfig(resamples=500, seed=3)
    d, lo, hi = paired_bootstrap(idx, diff("bad", "good"), cfg)
    assert lo <= d <= hi < 0 and d == pytest.approx(-20, abs=3)
    d0, lo0, hi0 = paired_bootstrap(idx, diff("same", "good"), cfg)
    assert d0 == lo0 == hi0 == 0.0  # identical answers: no uncertainty about the difference
    # deterministic for a seed, different for another
    assert paired_bootstrap(idx, diff("bad", "good"), cfg) == (
        d2 := paired_bootstrap(idx, diff("bad", "good"), cfg)
    )
    assert paired_bootstrap(idx, diff("bad", "good"), BootstrapConfig(500, 0.95, 4))[1:] != d2[1:]
    # a wider confidence gives a wider interval
    _, lo90, hi90 = paired_bootstrap(idx, diff("bad", "good"), BootstrapConfig(500, 0.80, 3))
    assert lo <= lo90 and hi90 <= hi


def test_small_noisy_difference_is_not_significant():
    rng = random.Random(1)
    a = [int(rng.random() < 0.6) for _ in range(40)]
    b = [int(rng.random() < 0.6) for _ in range(40)]
    d, lo, hi = paired_bootstrap(
        list(range(40)), lambda s: 100 * sum(b[i] - a[i] for i in s) / len(s), BootstrapConfig(400, 0.95, 0)
    )
    assert lo < 0 < hi


def test_rank_table_and_png(tmp_path):
    scores = {"raw": 40.0, "recap": 70.0, "filtered": 72.0}
    rows = rank(
        scores,
        lambda c, best: (
            scores[c] - scores[best],
            scores[c] - scores[best] - 5,
            scores[c] - scores[best] + 5,
        ),
    )
    assert [r.name for r in rows] == ["filtered", "recap", "raw"]
    assert rows[1].diff == -2.0 and rows[2].diff == -32.0
    table = format_table(rows, 0.95)
    lines = table.splitlines()
    assert "filtered" in lines[2] and "best" in lines[2]
    assert "not distinguishable" in lines[3] and "worse (significant)" in lines[4]
    assert "[-37.00, -27.00]" in lines[4]
    plot_ranking(rows, str(tmp_path / "r.png"), "t")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_on_prediction_files(tmp_path):
    """compare() rescored with the benchmarks' own rules from predictions TSVs."""
    rows = [
        {"index": str(i), "question": "What colour?", "answer": "red" if i % 2 else "blue"} for i in range(60)
    ]
    bench = tmp_path / "vqa.tsv"
    write_tsv(str(bench), ["index", "question", "answer"], rows)
    preds = {}
    for name, wrong_every in (("a", 10), ("b", 3)):
        path = tmp_path / f"{name}.tsv"
        write_tsv(
            str(path),
            ["index", "question", "answer", "prediction"],
            [
                dict(r, prediction=("green" if i % wrong_every == 0 else r["answer"]))
                for i, r in enumerate(rows)
            ],
        )
        preds[name] = {"vqa": str(path)}
    cfg = AblationConfig(
        candidates={"a": "x", "b": "y"},
        benchmarks={"vqa": str(bench)},
        tokens=1,
        out_dir=str(tmp_path),
        bootstrap=BootstrapConfig(300, 0.95, 0),
    )
    res = compare(cfg, preds)
    assert res["scores"]["a"]["vqa"] == pytest.approx(100 * 54 / 60)
    assert res["scores"]["b"]["vqa"] == pytest.approx(100 * 40 / 60)
    best, other = res["ranking"]
    assert best["name"] == "a" and other["diff"] == pytest.approx(100 * (40 - 54) / 60)
    assert other["low"] <= other["diff"] <= other["high"] < 0


def test_train_iters_from_token_budget():
    assert train_iters(256 * 8 * 10, 256, 8) == 10
    assert train_iters(256 * 8 * 10 + 1, 256, 8) == 11
    assert train_iters(5, 256, 8) == 1
    with pytest.raises(ValueError):
        train_iters(0, 256, 8)


def test_caption_benchmark_scoring():
    assert word_f1("one red circle on the left.", "One red circle on the left") == 1.0
    assert word_f1("one red circle on the left.", "IMG_0423.jpg") == 0.0
    assert word_f1("one red circle", "one blue circle") == pytest.approx(2 / 3)
    spec = get_benchmark("caption")
    item = Item(
        "0",
        {"index": "0", "question": "Describe the image.", "answer": "two blue squares on the right."},
        [b"x"],
    )
    assert spec.prompt(item).endswith("Describe the image.") and "<image>" in spec.prompt(item)
    s = spec.score([item], {"0": "two blue squares on the right."})
    assert s.score == 100.0 and s.details["exact_match"] == 100.0
