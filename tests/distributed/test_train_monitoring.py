"""Monitoring and --finetune in launched trainer runs (issue 13), tiny recipe on CPU/gloo.

A DP=2 run over a two-source blend logs to W&B offline (its files must appear), writes a
sample image per log line to TensorBoard, and reports the loss of each --data-path source; those losses, weighted by their loss tokens, must give the
step's loss. A --finetune run from its checkpoint starts again at iteration 1 with a fresh LR
schedule, on the loaded (not the random) weights.
"""

import json
import os
import subprocess
import sys

import pytest

from launcher import free_port
from testkit import ROOT, make_tiny_demo, subprocess_env

COMMON = [
    "--recipe",
    "tiny",
    "--stage",
    "sft-knowledge",
    "--global-batch-size",
    "4",
    "--micro-batch-size",
    "1",
    "--seq-length",
    "256",
    "--log-interval",
    "1",
    "--seed",
    "7",
    "--lr-warmup-iters",
    "1",
]


WANDB_OFFLINE = dict(WANDB_MODE="offline", WANDB_SILENT="true")


def _train(args, nproc=1):
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
    proc = subprocess.run(
        launcher + ["-m", "megatron_sail.train"] + COMMON + args,
        cwd=ROOT,
        env=subprocess_env(**WANDB_OFFLINE),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def blend_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("mon")
    data = make_tiny_demo(d, env=subprocess_env(**WANDB_OFFLINE), samples=60)
    run = d / "run"
    _train(
        [
            "--data-path",
            f"0.5 {data['train']} 0.5 {data['val']}",
            "--train-iters",
            "3",
            "--run-dir",
            str(run),
            "--save",
            str(d / "ckpt"),
            "--wandb-project",
            "sail-test",
            "--wandb-exp-name",
            "blend",
            "--log-images",
            "1",
        ],
        nproc=2,
    )
    return {"dir": d, "run": run, "data": data}


def test_wandb_offline_writes_its_files(blend_run):
    runs = list((blend_run["run"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((blend_run["run"] / "wandb").iterdir())
    files = list(runs[0].glob("run-*.wandb"))
    assert files and files[0].stat().st_size > 0


def test_sample_images_in_tensorboard(blend_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(blend_run["run"] / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["samples/image0"]
    steps = [e.step for e in acc.Images("samples/image0")]
    assert steps and set(steps) <= {1, 2, 3}  # at log lines whose micro-batch has an image


def test_per_dataset_losses_add_up_to_the_step_loss(blend_run):
    recs = _records(blend_run["run"])
    assert [r["iteration"] for r in recs] == [1, 2, 3]
    seen = set()
    for r in recs:
        tokens, losses = r["source_loss_tokens"], r["source_loss"]
        assert set(tokens) == {"train", "val"}
        seen |= {k for k, t in tokens.items() if t > 0}
        weighted = sum(losses[k] * tokens[k] for k in losses) / sum(tokens.values())
        assert weighted == pytest.approx(r["lm_loss"], rel=1e-6)
    assert seen == {"train", "val"}  # both sources fed some step


def test_finetune_resets_iteration_and_loads_weights(blend_run):
    d, data = blend_run["dir"], blend_run["data"]
    first = _records(blend_run["run"])[0]
    run = d / "ft"
    out = _train(
        [
            "--data-path",
            f"0.5 {data['train']} 0.5 {data['val']}",
            "--train-iters",
            "2",
            "--run-dir",
            str(run),
            "--load",
            str(d / "ckpt"),
            "--finetune",
        ]
    )
    assert "--finetune" in out
    recs = _records(run)
    assert [r["iteration"] for r in recs] == [1, 2]  # not 4, 5: the iteration starts again
    assert recs[0]["lr"] == pytest.approx(first["lr"])  # the LR schedule starts again
    # same rows and seed as the blend run's step 1, but the trained weights: another loss
    assert recs[0]["lm_loss"] != pytest.approx(first["lm_loss"], rel=1e-6)


def test_no_load_optim_continues_the_iteration_with_a_fresh_schedule(blend_run):
    d, data = blend_run["dir"], blend_run["data"]
    run = d / "nlo"
    out = _train(
        [
            "--data-path",
            f"0.5 {data['train']} 0.5 {data['val']}",
            "--train-iters",
            "5",
            "--run-dir",
            str(run),
            "--load",
            str(d / "ckpt"),
            "--no-load-optim",
        ]
    )
    assert "--no-load-optim" in out
    recs = {r["iteration"]: r for r in _records(run)}
    assert sorted(recs) == [4, 5]  # the iteration continues from the checkpoint's 3
    peak = _records(blend_run["run"])[0]["lr"]  # after one step the 1-step warmup is done
    # a restored schedule would be at step 4 of its cosine decay by now; a fresh one is at 1
    assert recs[4]["lr"] == pytest.approx(peak) and recs[5]["lr"] < peak
