"""Trainer paths that a first GPU run would take, exercised on CPU/gloo (issue 11).

- bf16 weights loaded without optimizer state (--init-from, or --load of a checkpoint saved
  before the first update) survive the first step: Megatron's bf16 optimizers keep fp32 copies
  made when they were built, which must be refreshed from the loaded weights. On CPU the trainer
  ignores --bf16, so these runs put the GPU's dtype in place of check_precision's answer.
- Pipeline parallel with micro-batch size > 1: activations travel packed ([B*S, 1, h]).
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from launcher import free_port
from testkit import ROOT, make_tiny_demo, subprocess_env

COMMON = [
    "--recipe",
    "tiny",
    "--stage",
    "sft-knowledge",
    "--global-batch-size",
    "4",
    "--seq-length",
    "256",
    "--log-interval",
    "1",
    "--eval-interval",
    "0",
    "--seed",
    "7",
]
# An LR schedule whose one step moves no weight by a bf16 ulp (the weights-only checkpoint
# below is saved with it too, so that resuming it keeps the schedule).
TINY_LR = ["--lr", "1e-9", "--min-lr", "1e-9", "--lr-decay-iters", "1"]
# The trainer in bf16, as --bf16 makes it on a GPU (a script: torchrun does not take -c).
BF16 = """
import sys, torch
import megatron_sail.train as T
T.check_precision = lambda cfg: torch.bfloat16
T.main(sys.argv[1:])
"""


def _run(nproc: int, args: list, script: str | None = None) -> None:
    """One trainer run (torchrun for nproc > 1; ``script`` instead of the trainer module);
    fails the test with the log tail."""
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
        ]
        if nproc > 1
        else [sys.executable]
    )
    entry = [script] if script else ["-m", "megatron_sail.train"]
    proc = subprocess.run(
        launcher + entry + COMMON + args,
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def _weights(ckpt_dir, tmp_path) -> dict:
    """Model tensors of a saved checkpoint, by global key."""
    out = tmp_path / f"w{abs(hash(str(ckpt_dir)))}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    sd = torch.load(out, weights_only=False)
    return {
        k: v
        for k, v in sd.items()
        if not k.startswith("optimizer") and isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Demo rows and a weights-only checkpoint from another seed (so its weights differ from
    the random init every run below starts with)."""
    d = tmp_path_factory.mktemp("gpu_paths")
    out = dict(
        make_tiny_demo(d, splits=("train",), samples=60),
        other=str(d / "other"),
        bf16=str(d / "bf16_train.py"),
    )
    (d / "bf16_train.py").write_text(BF16)
    _run(
        1,
        [
            "--data-path",
            out["train"],
            "--run-dir",
            str(d / "other_run"),
            "--seed",
            "8",
            "--train-iters",
            "0",
            "--save",
            out["other"],
            "--micro-batch-size",
            "1",
        ]
        + TINY_LR,
    )
    return out


def _assert_bf16_of(saved: dict, loaded: dict) -> None:
    """Every saved bf16 tensor is the loaded fp32 one rounded to bf16 (one ulp of slack for a
    1e-9 update crossing a rounding boundary)."""
    assert saved.keys() == loaded.keys()
    for k in loaded:
        assert saved[k].dtype == torch.bfloat16, k
        want = loaded[k].float().bfloat16().float()
        torch.testing.assert_close(
            saved[k].float(), want, rtol=2**-7, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )


@pytest.mark.parametrize("how", ["init_from_1rank", "load_weights_only_dp2"])
def test_bf16_weights_loaded_without_optimizer_state_survive_a_step(data, tmp_path, how):
    """One step at LR 1e-9 after loading: the weights stay the loaded ones (within bf16
    rounding) instead of jumping back to the run's random init. Covers Megatron's
    Float16Optimizer (1 rank, --init-from) and its distributed optimizer (DP=2, --load of a
    checkpoint that holds no optimizer state)."""
    ckpt = tmp_path / "ckpt"
    args = [
        "--data-path",
        data["train"],
        "--run-dir",
        str(tmp_path),
        "--train-iters",
        "1",
        "--save",
        str(ckpt),
        "--micro-batch-size",
        "1",
    ] + TINY_LR
    if how == "init_from_1rank":
        _run(1, args + ["--init-from", data["other"], "--no-use-distributed-optimizer"], data["bf16"])
    else:
        _run(2, args + ["--load", data["other"], "--use-distributed-optimizer"], data["bf16"])
    loaded = _weights(os.path.join(data["other"], "iter_0000000"), tmp_path)
    _assert_bf16_of(_weights(ckpt / "iter_0000001", tmp_path), loaded)


def _losses(run_dir) -> dict:
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["iteration"]: r["lm_loss"] for r in map(json.loads, f)}


def test_pipeline_parallel_with_micro_batch_2_tracks_one_rank(data, tmp_path):
    """PP=2 with micro-batch 2 (2 rows of 256 tokens per forward) follows the single-rank run
    of the same micro-batches; the packed [512, 1, h] activations must fit the receive buffers."""
    args = [
        "--data-path",
        data["train"],
        "--train-iters",
        "3",
        "--lr-decay-iters",
        "3",
        "--micro-batch-size",
        "2",
        "--init-from",
        data["other"],
    ]
    _run(1, args + ["--run-dir", str(tmp_path / "one")])
    _run(2, args + ["--run-dir", str(tmp_path / "pp2"), "--pipeline-model-parallel-size", "2"])
    ref, pp = _losses(tmp_path / "one"), _losses(tmp_path / "pp2")
    assert sorted(pp) == sorted(ref) == [1, 2, 3]
    for it in ref:
        assert pp[it] == pytest.approx(ref[it], rel=1e-5), (it, pp[it], ref[it])
