"""The data-scaling fit recovers known a, b from synthetic metrics.jsonl files, and the tool
prints them, the extrapolation and writes the plot."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_sail.eval.registry import get_benchmark
from megatron_sail.eval.scaling import (
    AVERAGE,
    extrapolate,
    fit_log_linear,
    metric_max,
    normalized,
    parse_tokens,
    read_points,
)
from testkit import ROOT, subprocess_env


def write_run(run: Path, rows: list[dict]) -> None:
    run.mkdir(parents=True)
    lines = [
        json.dumps({"iteration": i, "lm_loss": 1.0, "consumed_tokens": 10 * i}) for i in range(1, 3)
    ]  # step records without scores are ignored
    lines += [json.dumps(r) for r in rows] + ['{"iteration": 99, "benchmarks/pope": 1']  # cut line
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_fit_recovers_known_coefficients():
    tokens = np.geomspace(1e8, 1e11, 7)
    rng = np.random.default_rng(0)
    f = fit_log_linear(tokens, 5.0 + 2.5 * np.log(tokens))
    assert f.a == pytest.approx(5.0, abs=1e-9) and f.b == pytest.approx(2.5, abs=1e-12)
    assert f.r2 == pytest.approx(1.0)
    assert f.predict(655e9) == pytest.approx(5.0 + 2.5 * math.log(655e9))
    noisy = fit_log_linear(tokens, 5.0 + 2.5 * np.log(tokens) + rng.normal(0, 0.5, 7))
    assert abs(noisy.b - 2.5) < 0.5 and 0.9 < noisy.r2 < 1.0
    with pytest.raises(ValueError, match="two or more"):
        fit_log_linear([1e9, 1e9], [1.0, 2.0])
    assert parse_tokens("655B") == 655e9 and parse_tokens("2e9") == 2e9


def test_tool_reads_runs_fits_and_plots(tmp_path):
    def pope(t):
        return 20.0 + 2.0 * math.log(t)

    def mme(t):
        return 100.0 + 20.0 * math.log(t)

    toks = [1e9, 4e9, 16e9, 64e9]
    write_run(
        tmp_path / "r1",
        [
            {"iteration": 10 * i, "consumed_tokens": t, "benchmarks/pope": pope(t), "benchmarks/mme": mme(t)}
            for i, t in enumerate(toks[:2])
        ],
    )
    write_run(
        tmp_path / "r2",
        [
            {"iteration": 10 * i, "consumed_tokens": t, "benchmarks/pope": pope(t), "benchmarks/mme": mme(t)}
            for i, t in enumerate(toks[2:])
        ],
    )
    pts = read_points([str(tmp_path / "r1"), str(tmp_path / "r2")]).series
    assert sorted(pts) == [AVERAGE, "mme", "pope"] and len(pts["pope"]) == 4
    (tmp_path / "empty").mkdir()
    out = subprocess.run(
        [
            sys.executable,
            "tools/scaling_law.py",
            str(tmp_path / "r1"),
            str(tmp_path / "empty"),
            str(tmp_path / "r2"),
            "--out",
            str(tmp_path / "fit"),
            "--budget",
            "655B",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("pope:"))
    assert "a=20.0000 b=2.0000 R^2=1.0000 points=4" in line
    assert f"score@655B={pope(655e9):.2f}" in line and "CAPPED" not in line
    assert f"skip {tmp_path / 'empty'}: no metrics.jsonl" in out.stdout
    avg = next(x for x in out.stdout.splitlines() if x.startswith("average:"))
    # the mean of pope (percent) and mme normalized to 0-100 (out of 2,800 points)
    assert f"a={(20 + 100 / 28) / 2:.4f} b={(2 + 20 / 28) / 2:.4f}" in avg
    fits = json.loads((tmp_path / "fit" / "fits.json").read_text())
    assert fits["mme"]["b"] == pytest.approx(20.0)
    assert (tmp_path / "fit" / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_normalized_average_capped_extrapolation_and_flat_scores(tmp_path):
    """OCRBench (count of correct items) joins the average as a percentage of its items; an
    extrapolation past the maximum is capped and flagged; flat scores have R^2 n/a."""
    assert metric_max("ocrbench") == 1000 and metric_max("ocrbench", 100) == 100
    assert metric_max("mme") == 2800 and metric_max("vqa@level1") == 100
    assert normalized("ocrbench", 835) == pytest.approx(83.5)
    toks = [1e6, 1e7, 1e8]
    rows = [
        {
            "consumed_tokens": t,
            "benchmarks/ocrbench": 20 * k + 20,
            "benchmarks_n/ocrbench": 100,
            "benchmarks/pope": 50.0,
        }
        for k, t in enumerate(toks)
    ]
    write_run(tmp_path / "one", rows)
    pts = read_points([str(tmp_path / "one")])
    assert pts.maxima["ocrbench"] == 100
    assert [s for _, s in pts.series[AVERAGE]] == pytest.approx([35.0, 45.0, 55.0])
    flat = fit_log_linear(toks, [50.0] * 3)
    assert flat.r2 is None and flat.b == pytest.approx(0.0, abs=1e-9)
    rising = fit_log_linear(toks, [s for _, s in pts.series["ocrbench"]])
    e = extrapolate(rising, 655e9, 100.0)
    assert e.capped and e.value == 100.0 and e.raw > 100.0
    assert not extrapolate(rising, 1e7, 100.0).capped
    out = subprocess.run(
        [sys.executable, "tools/scaling_law.py", str(tmp_path / "one"), "--out", str(tmp_path / "fit")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "R^2=n/a" in next(x for x in out.stdout.splitlines() if x.startswith("pope:"))
    ocr = next(x for x in out.stdout.splitlines() if x.startswith("ocrbench:"))
    assert "score@655B=100.00 CAPPED at 100" in ocr
    fits = json.loads((tmp_path / "fit" / "fits.json").read_text())
    assert fits["pope"]["r2"] is None and fits["ocrbench"]["capped"] is True


def test_labelled_benchmark_names_keep_the_rule():
    spec = get_benchmark("vqa@level2")
    assert spec.name == "vqa@level2" and spec.scorer is get_benchmark("vqa").scorer
    with pytest.raises(ValueError, match="unknown benchmark"):
        get_benchmark("nope@x")
    with pytest.raises(ValueError, match="unknown benchmark"):
        get_benchmark("vqa@a/b")
