"""GPU only: the tiny_moe recipe (Qwen3-MoE LM, 4 experts, top-2) trains in bf16 on one GPU,
through Transformer Engine's MoE spec (grouped-GEMM experts) when TE is importable, else the
local spec on CUDA; the load-balancing loss is logged every step. Skips without CUDA.
(Expert parallelism itself needs 2+ GPUs; on CPU it is tested in tests/distributed.)"""

import json
import math
import subprocess
import sys

import pytest
import torch
from test_train_gpu import GPU_ENV, ROOT, data  # noqa: F401  (data: the shared demo-set fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
STEPS = 20


def test_tiny_moe_trains_on_one_gpu(data, tmp_path):  # noqa: F811
    """Finite losses whose last steps' mean is clearly below the first steps'; a positive,
    finite load_balancing_loss (about 1 when balanced) at every step."""
    args = [
        "--recipe",
        "tiny_moe",
        "--stage",
        "sft-knowledge",
        "--data-path",
        data,
        "--train-iters",
        str(STEPS),
        "--lr-decay-iters",
        str(STEPS),
        "--global-batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--seq-length",
        "256",
        "--log-interval",
        "5",
        "--eval-interval",
        "0",
        "--seed",
        "7",
        "--run-dir",
        str(tmp_path),
        "--bf16",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_sail.train", *args],
        cwd=ROOT,
        env=GPU_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(tmp_path / "metrics.jsonl") as f:
        rec = [json.loads(line) for line in f]
    assert [r["iteration"] for r in rec] == list(range(1, STEPS + 1))
    losses = [r["lm_loss"] for r in rec]
    assert all(math.isfinite(x) for x in losses) and not any(r["skipped"] for r in rec), losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    balance = [r["load_balancing_loss"] for r in rec]
    assert all(b is not None and 0.5 < b < 4.0 for b in balance), balance
    assert "load_balancing_loss" in proc.stdout
