"""End-to-end trainer runs of the tiny recipe on CPU/gloo (torchrun subprocesses).

One uninterrupted single-rank run is the reference; TP=2 / PP=2 / DP=2 runs must track its
loss curve at the same global batch, a run stopped at step 10 and resumed must repeat its
steps 11-20, a TP=2 checkpoint must resume at PP=2, a pretrain-alignment stage started with
--init-from must leave the frozen ViT and LM untouched, and SIGTERM must save and exit 0.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from launcher import free_port
from testkit import ROOT, subprocess_env

STEPS = 20
# Float32 runs whose reductions happen in a different order (TP splits matmuls, PP/DP change
# nothing numerically but the schedule) drift apart by rounding that Adam amplifies a little
# over 20 steps; measured max relative gap 1.0e-7 (TP), 7-8e-8 (PP, DP, TP->PP resume).
# Stated tolerance (100x the measured gap):
PARALLEL_RTOL = 1e-5
COMMON = [
    "--recipe",
    "tiny",
    "--stage",
    "sft-knowledge",
    "--train-iters",
    str(STEPS),
    "--lr-decay-iters",
    str(STEPS),
    "--global-batch-size",
    "4",
    "--micro-batch-size",
    "1",
    "--seq-length",
    "256",
    "--log-interval",
    "5",
    "--eval-interval",
    "0",
    "--seed",
    "7",
]


def _cmd(nproc: int, args: list[str]) -> list[str]:
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
    return launcher + ["-m", "megatron_sail.train"] + args


def train(data, run_dir, nproc=1, extra=(), expect_rc=0, init=None):
    """Run the trainer from the shared initial weights (``init`` or the fixture's); returns
    {iteration: loss}."""
    args = (
        COMMON
        + ["--data-path", data["train"], "--run-dir", str(run_dir), "--init-from", init or data["init"]]
        + list(extra)
    )
    proc = subprocess.run(
        _cmd(nproc, args), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    log = [line for line in (proc.stdout + proc.stderr).splitlines() if "RNG state" not in line]
    assert proc.returncode == expect_rc, "\n".join(log[-60:])
    return losses(run_dir)


def records(run_dir) -> dict:
    """metrics.jsonl lines by iteration."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["iteration"]: r for r in map(json.loads, f)}


def losses(run_dir) -> dict:
    return {it: r["lm_loss"] for it, r in records(run_dir).items()}


def weights(ckpt_dir, tmp_path) -> dict:
    """Model tensors of a saved checkpoint, by global key."""
    out = tmp_path / f"w{abs(hash(str(ckpt_dir)))}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if not k.startswith("optimizer") and isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def data(tiny_demo, tmp_path_factory):
    """The session's tiny demo set (conftest) and initial weights made from it."""
    d = tmp_path_factory.mktemp("init")
    out = dict(tiny_demo, init=str(d / "init"))
    # Initial weights shared by every run: Megatron draws TP/PP-sharded weights from
    # rank-specific RNG streams, so runs at different layouts would otherwise start apart.
    args = COMMON + [
        "--data-path",
        out["train"],
        "--run-dir",
        str(d / "init_run"),
        "--train-iters",
        "0",
        "--save",
        out["init"],
    ]
    subprocess.run(_cmd(1, args), cwd=ROOT, env=subprocess_env(), check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted single-rank run, saving at the end."""
    run = tmp_path_factory.mktemp("ref")
    curve = train(
        data, run, 1, ["--save", str(run / "ckpt"), "--valid-data-path", data["val"], "--eval-iters", "1"]
    )
    return {"dir": run, "losses": curve}


def _assert_tracks(curve, ref, steps, rtol):
    print(f"max relative loss gap {max(abs(curve[it] / ref[it] - 1) for it in steps):.2e}")
    for it in steps:
        assert curve[it] == pytest.approx(ref[it], rel=rtol), (it, curve[it], ref[it])


def test_reference_learns_and_reports(reference):
    """The loss drops, and metrics.jsonl / TensorBoard / validation hold the listed values."""
    ref = reference["losses"]
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert sum(ref[i] for i in range(16, 21)) < sum(ref[i] for i in range(1, 6)) - 0.5
    run = reference["dir"]
    with open(run / "metrics.jsonl") as f:
        rec = json.loads(f.readline())
    for key in ("iteration", "lm_loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu"):
        assert rec[key] is not None and (key == "iteration" or rec[key] > 0), key
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    with open(run / "valid_metrics.jsonl") as f:
        assert json.loads(f.readline())["iteration"] == STEPS
    assert (run / "config.yaml").exists() and (run / "ckpt" / "latest").read_text().strip() == "20"


@pytest.mark.parametrize(
    "layout",
    [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"], []],
    ids=["tp2", "pp2", "dp2"],
)
def test_parallel_layout_tracks_single_rank(data, reference, tmp_path, layout):
    """Same global batch over 2 ranks: TP=2, PP=2 or DP=2 follows the single-rank curve."""
    extra = list(layout)
    if "--tensor-model-parallel-size" in layout:
        extra += ["--save", str(tmp_path / "ckpt"), "--save-interval", "10"]
    curve = train(data, tmp_path, 2, extra)
    _assert_tracks(curve, reference["losses"], range(1, STEPS + 1), PARALLEL_RTOL)
    # Counters of the global batch (under PP, images are decoded on the first stage only and
    # their counts reach the last stage by broadcast) equal the single-rank run's.
    mine, ref = records(tmp_path), records(reference["dir"])
    for it in range(1, STEPS + 1):
        for key in ("tokens", "samples", "images", "tiles"):
            assert mine[it][key] == ref[it][key], (it, key, mine[it][key], ref[it][key])
    if "--tensor-model-parallel-size" in layout:
        # Save at TP=2, resume at PP=2: steps 11-20 still track the reference.
        resumed = tmp_path / "pp2"
        curve = train(
            data,
            resumed,
            2,
            ["--pipeline-model-parallel-size", "2", "--load", str(tmp_path / "ckpt" / "iter_0000010")],
        )
        assert sorted(curve) == list(range(11, STEPS + 1))
        _assert_tracks(curve, reference["losses"], range(11, STEPS + 1), PARALLEL_RTOL)


def test_micro_batch_size_does_not_change_the_loss(data, reference, tmp_path):
    """Micro-batch 2 instead of 1 at the same global batch (2 micro-batches per step instead
    of 4, rows with different loss-token counts): every step's loss and update stay the same up
    to rounding. (DP=2 vs 1 is the dp2 case of the layout test.)"""
    curve = train(data, tmp_path, 1, ["--micro-batch-size", "2", "--exit-interval", "6"])
    assert sorted(curve) == list(range(1, 7))
    _assert_tracks(curve, reference["losses"], range(1, 7), PARALLEL_RTOL)
    mine, ref = records(tmp_path), records(reference["dir"])
    assert all(mine[it]["tokens"] == ref[it]["tokens"] for it in range(1, 7))


def test_interleaved_pipeline_tracks_single_rank(data, tmp_path):
    """A 4-layer LM at PP=2 with one layer per virtual stage (2 chunks per rank, Megatron's
    interleaved 1F1B schedule) follows the single-rank curve of the same 4-layer model."""
    deep = tmp_path / "deep.yaml"
    deep.write_text("model:\n  language:\n    num_layers: 4\n")
    init = str(tmp_path / "init")
    base = ["--config", str(deep), "--exit-interval", "10"]
    subprocess.run(
        _cmd(
            1,
            COMMON
            + [
                "--data-path",
                data["train"],
                "--config",
                str(deep),
                "--run-dir",
                str(tmp_path / "init_run"),
                "--train-iters",
                "0",
                "--save",
                init,
            ],
        ),
        cwd=ROOT,
        env=subprocess_env(),
        check=True,
        capture_output=True,
    )
    ref = train(data, tmp_path / "ref", 1, base, init=init)
    curve = train(
        data,
        tmp_path / "vpp",
        2,
        base + ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
        init=init,
    )
    assert sorted(curve) == sorted(ref) == list(range(1, 11))
    assert sum(ref[i] for i in range(8, 11)) < sum(ref[i] for i in range(1, 4))
    _assert_tracks(curve, ref, range(1, 11), PARALLEL_RTOL)


def test_stop_at_10_and_resume_repeats_losses(data, reference, tmp_path):
    """Exit after step 10 with a checkpoint, resume: steps 11-20 repeat the reference."""
    ckpt = str(tmp_path / "ckpt")
    first = train(data, tmp_path, 1, ["--save", ckpt, "--exit-interval", "10"])
    assert max(first) == 10 and open(os.path.join(ckpt, "latest")).read().strip() == "10"
    curve = train(data, tmp_path, 1, ["--save", ckpt, "--load", ckpt])
    for it in range(1, STEPS + 1):
        assert curve[it] == pytest.approx(reference["losses"][it], rel=1e-6, abs=1e-6), it


def test_alignment_stage_from_init_keeps_frozen_modules(data, reference, tmp_path):
    """--init-from loads weights only (iterations restart at 0), and in pretrain-alignment only
    the projector changes."""
    ckpt = tmp_path / "ckpt"
    args = COMMON + [
        "--data-path",
        data["train"],
        "--run-dir",
        str(tmp_path),
        "--stage",
        "pretrain-alignment",
        "--train-iters",
        "3",
        "--lr-decay-iters",
        "3",
        "--init-from",
        str(reference["dir"] / "ckpt"),
        "--save",
        str(ckpt),
    ]
    subprocess.run(_cmd(1, args), cwd=ROOT, env=subprocess_env(), check=True, capture_output=True)
    assert (ckpt / "latest").read_text().strip() == "3"
    before = weights(reference["dir"] / "ckpt" / "iter_0000020", tmp_path)
    after = weights(ckpt / "iter_0000003", tmp_path)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projector.") for k in changed), sorted(changed)[:5]


def test_sigterm_saves_and_exits_zero(data, tmp_path):
    """SIGTERM mid-run: the trainer saves the current step, points `latest` at it, exits 0."""
    ckpt = tmp_path / "ckpt"
    args = COMMON + [
        "--data-path",
        data["train"],
        "--run-dir",
        str(tmp_path),
        "--save",
        str(ckpt),
        "--train-iters",
        "100000",
        "--lr-decay-iters",
        "100000",
    ]
    proc = subprocess.Popen(
        _cmd(1, args),
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM" in out
    saved = int((ckpt / "latest").read_text())
    assert saved >= 3 and saved == max(losses(tmp_path))
    assert (ckpt / f"iter_{saved:07d}" / "train_state.pt").exists()


# Runs the trainer with the loss of chosen steps turned into NaN (4 micro-batches per step).
POISON = """
import sys
import megatron_sail.training.step as st
from megatron_sail import cli
from megatron_sail.train import main
BAD, calls, original = {2, 4, 5, 6, 7, 8, 9, 10}, [0], st.loss_func
def poisoned(mask, out):
    calls[0] += 1
    return original(mask, out * float("nan") if (calls[0] - 1) // 4 + 1 in BAD else out)
st.loss_func = poisoned
cli.run(main, sys.argv[1:])  # exits with main's code, as `python -m megatron_sail.train` does
"""


def test_nan_steps_are_skipped_and_k_in_a_row_stop(data, tmp_path):
    """A NaN step changes nothing and is counted; after --max-skipped-steps consecutive ones the
    run saves the last good weights and exits 1."""
    ckpt = tmp_path / "ckpt"
    args = COMMON + [
        "--data-path",
        data["train"],
        "--run-dir",
        str(tmp_path),
        "--init-from",
        data["init"],
        "--save",
        str(ckpt),
        "--save-interval",
        "3",
        "--train-iters",
        "10",
        "--lr-decay-iters",
        "10",
        "--max-skipped-steps",
        "2",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", POISON] + args,
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    assert "2 consecutive steps with NaN/Inf" in proc.stdout
    rec = records(tmp_path)
    assert sorted(rec) == [1, 2, 3, 4, 5]
    assert [it for it in rec if rec[it]["skipped"]] == [2, 4, 5]
    assert all(rec[it]["grad_norm"] is None for it in (2, 4, 5))
    assert all(rec[it]["grad_norm"] > 0 for it in (1, 3)) and rec[5]["skipped_steps"] == 3
    assert (ckpt / "latest").read_text().strip() == "5"
    good, last = weights(ckpt / "iter_0000003", tmp_path), weights(ckpt / "iter_0000005", tmp_path)
    assert good.keys() == last.keys() and all(torch.equal(good[k], last[k]) for k in good)
    state = torch.load(ckpt / "iter_0000005" / "train_state.pt", weights_only=False)
    assert state["train_state"]["skipped_steps"] == 3
    assert state["train_state"]["scheduler"]["num_steps"] == 2  # two real updates


def test_trained_checkpoint_exports_to_transformers(reference, tmp_path):
    """mcore-to-hf takes a training checkpoint (weights plus optimizer state) and writes what
    transformers loads, with the trained weights."""
    ckpt = reference["dir"] / "ckpt" / f"iter_{STEPS:07d}"
    out = tmp_path / "hf"
    proc = subprocess.run(
        [
            sys.executable,
            "tools/convert_checkpoint.py",
            "mcore-to-hf",
            "--mcore-dir",
            str(ckpt),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import InternVLForConditionalGeneration

    hf = InternVLForConditionalGeneration.from_pretrained(str(out))
    trained = weights(ckpt, tmp_path)["language_model.embedding.word_embeddings.weight"]
    assert torch.equal(hf.get_input_embeddings().weight.detach(), trained)
