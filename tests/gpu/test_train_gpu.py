"""GPU only: the trainer's bf16 path (bf16 weights, fp32 main params, NCCL, Megatron-Core DDP with
overlapped grad reduce) and, with Transformer Engine on an FP8-capable GPU, its FP8 path train
the tiny recipe: a few steps on one GPU with finite, decreasing losses. Skips without CUDA."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from testkit import ROOT, subprocess_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

STEPS = 20
# The trainer's subprocess environment, on the first visible GPU only.
GPU_ENV = subprocess_env(CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])


def _fp8_ready() -> bool:
    """TE imports and the GPU has FP8 tensor cores (compute capability 8.9 or newer)."""
    from megatron_sail.models import layer_specs

    return layer_specs.te_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.fixture(scope="module")
def data(tiny_demo):
    """The small demo set preprocessed to the tiny recipe's geometry (conftest's tiny_demo)."""
    return tiny_demo["train"]


@pytest.mark.parametrize(
    "precision",
    [
        ["--bf16"],
        pytest.param(
            ["--bf16", "--fp8-format", "hybrid"],
            marks=pytest.mark.skipif(
                not torch.cuda.is_available() or not _fp8_ready(), reason="needs TE and an FP8 GPU"
            ),
        ),
    ],
    ids=["bf16", "fp8_hybrid"],
)
def test_tiny_recipe_trains_on_one_gpu(data, tmp_path, precision):
    """STEPS steps of the tiny recipe (micro-batch 2 x 256 tokens: FP8's 16-token alignment
    holds): every loss is finite, the last steps' mean is clearly below the first steps'."""
    args = [
        "--recipe",
        "tiny",
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
        *precision,
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
    with open(tmp_path / "config.yaml") as f:
        assert ("fp8_format: hybrid" in f.read()) == ("--fp8-format" in precision)
    with open(tmp_path / "metrics.jsonl") as f:
        rec = [json.loads(line) for line in f]
    assert [r["iteration"] for r in rec] == list(range(1, STEPS + 1))
    losses = [r["lm_loss"] for r in rec]
    assert all(math.isfinite(x) for x in losses) and not any(r["skipped"] for r in rec), losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert all(r["tflops_per_gpu"] > 0 and r["grad_norm"] > 0 for r in rec)
