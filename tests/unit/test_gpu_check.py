"""scripts/gpu_check.sh runs to its end on a CPU machine (every GPU check skipped with its
reason, both reports written), and tools/gpu_check.py turns check outputs into figures."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_sail.bench import gpu_check
from testkit import ROOT

CHECKS = [
    "gpu_tests",
    "logits_bf16",
    "trainer_bf16",
    "trainer_fp8",
    "dali_gpu",
    "decode_speed",
    "compare_hf",
    "fp8_speed",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs every check")
def test_script_on_cpu_reports_every_check_skipped(tmp_path):
    out = tmp_path / "gc"
    env = dict(os.environ, OMP_NUM_THREADS="1", PY=sys.executable)
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--out", str(out), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in CHECKS:
        assert f"[gpu_check] {name}: SKIPPED - no CUDA device" in proc.stdout, name
    rep = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in rep["checks"]] == CHECKS
    assert all(c["status"] == "skipped" and "CUDA" in c["reason"] for c in rep["checks"])
    assert rep["summary"] == {"passed": 0, "failed": 0, "timed_out": 0, "skipped": len(CHECKS)}
    assert rep["card"] == {} and rep["versions"]["torch"] == torch.__version__
    assert rep["versions"]["megatron-core"] == "0.16.1"
    md = (out / "report.md").read_text()
    assert "- card: none (no CUDA device)" in md and "| megatron-core | 0.16.1 |" in md
    assert all(f"| {name} | skipped |" in md for name in CHECKS)


def test_figures_from_check_outputs(tmp_path):
    tool = gpu_check
    log = tmp_path / "a.log"
    log.write_text(
        "noise\ntp=1 atol=1.0\nmax_abs_logit_diff=0.0156 max_rel_logit_diff=9.1e-03\n"
        "[dali] backend=dali images=120 seconds=2.00\n"
        "[dali] images_per_s=60.00 tiles_per_s=780.00\n"
    )
    kv = tool.figures("kv", log, [])
    assert kv["max_abs_logit_diff"] == 0.0156 and kv["max_rel_logit_diff"] == 0.0091
    assert kv["dali.images_per_s"] == 60.0 and kv["dali.tiles_per_s"] == 780.0
    assert "dali.backend" not in kv
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="t.a" name="ok"/>'
        '<testcase classname="t.a" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="t.b" name="te"><skipped message="needs TE"/>'
        "</testcase></testsuite></testsuites>"
    )
    j = tool.figures("junit", None, [junit])
    assert (j["tests"], j["passed"], j["failed"], j["skipped"]) == (3, 1, 1, 1)
    assert j["failed_tests"] == ["t.a::bad"] and j["skip_reasons"] == {"t.b::te": "needs TE"}
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "\n".join(
            json.dumps(
                {
                    "lm_loss": 6.0 - i,
                    "tokens_per_s": 100.0 * (i + 1),
                    "tflops_per_gpu": 1.0,
                    "memory_gib": 2.0 + i,
                }
            )
            for i in range(3)
        )
        + "\n"
    )
    m = tool.figures("metrics", None, [metrics])
    assert (m["steps"], m["first_loss"], m["last_loss"]) == (3, 6.0, 4.0)
    assert m["tokens_per_s"] == 250.0 and m["memory_gib"] == 4.0  # mean after step 1, max
    for stem, tps, mem in (("hf", 100.0, 30.0), ("ours", 160.0, 28.0), ("fp8", 200.0, 27.0)):
        (tmp_path / f"{stem}.json").write_text(
            json.dumps(
                {
                    "tokens_per_s": tps,
                    "tflops_per_gpu": 1.0,
                    "mfu": 0.1,
                    "peak_memory_gib": mem,
                    "step_time_s": 1.0,
                }
            )
        )
    b = tool.figures("benchmark", None, [tmp_path / "hf.json", tmp_path / "ours.json"])
    assert b["speedup_vs_hf"] == 1.6 and b["ours.peak_memory_gib"] == 28.0
    f8 = tool.figures("benchmark", None, [tmp_path / "fp8.json", tmp_path / "missing.json"])
    goals = tool.goals({"compare_hf": {"figures": b}, "fp8_speed": {"figures": f8}})
    assert [g["met"] for g in goals] == [True, True] and goals[1]["value"] == "1.25x"


def test_report_lists_figures_reasons_and_goals(tmp_path):
    tool = gpu_check
    (tmp_path / "probe.json").write_text(
        json.dumps(
            {
                "date": "2026-12-01 20:00 UTC",
                "host": "h",
                "versions": {"torch": "2.13.0"},
                "card": {
                    "name": "NVIDIA H200",
                    "count": 1,
                    "capability": "9.0",
                    "memory_gib": 139.8,
                    "driver": "580",
                },
                "te_range": {"ok": True, "note": "Transformer Engine 2.10 is inside"},
                "can": {},
            }
        )
    )
    tool.record(
        tmp_path,
        tool.CheckRecord(
            "compare_hf",
            "passed",
            seconds=90.0,
            figures={
                "hf.tokens_per_s": 100.0,
                "ours.tokens_per_s": 120.0,
                "speedup_vs_hf": 1.2,
                "hf.peak_memory_gib": 30.0,
                "ours.peak_memory_gib": 31.0,
            },
        ),
    )
    tool.record(tmp_path, tool.CheckRecord("dali_gpu", "skipped", reason="DALI unavailable"))
    rep = tool.report(tmp_path, "bash scripts/gpu_check.sh")
    assert rep["summary"]["passed"] == 1 and rep["summary"]["skipped"] == 1
    assert rep["goals"][0]["met"] is False  # 1.2x < 1.5x and more memory
    md = (tmp_path / "report.md").read_text()
    assert "NVIDIA H200 x1, compute capability 9.0, 139.8 GiB" in md
    assert "speedup_vs_hf=1.2" in md and "| dali_gpu | skipped | 0 | DALI unavailable |" in md
    assert "| no |" in md
