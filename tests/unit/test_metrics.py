"""MetricsWriter output read back: metrics.jsonl, TensorBoard events, console lines."""

import io
import json
import math

import pytest

from megatron_sail.training.metrics import MetricsConfig, MetricsWriter, StepStats, Stopwatch, VisionTiming


def _stats(i, loss, skipped=False, decode_failures=0):
    return StepStats(
        iteration=i,
        lm_loss=loss,
        lr={"vit": 1e-5 * i, "lm": 2e-5 * i},
        grad_norm=0.5 * i,
        step_time_s=2.0,
        tokens=1000,
        samples=4,
        images=3,
        tiles=7,
        flops=8e12,
        data_wait_s=0.25,
        skipped=skipped,
        decode_failures=decode_failures,
        consumed_samples=4 * i,
        consumed_tokens=1000 * i,
    )


class _Terminal(io.StringIO):
    """A captured stream that says it is a terminal (where the progress bar is drawn)."""

    def isatty(self) -> bool:
        return True


def _run(tmp_path, steps, cfg, rank=0, log_interval=2, terminal=False):
    out = _Terminal() if terminal else io.StringIO()
    with MetricsWriter(tmp_path / "run", tmp_path / "tb", log_interval, rank, cfg, stream=out) as w:
        for i, loss in steps:
            w.log_step(_stats(i, loss, skipped=math.isnan(loss), decode_failures=int(i == 2)))
        w.log_eval(steps[-1][0], 3.5)
    return out.getvalue()


def test_jsonl_values(tmp_path):
    cfg = MetricsConfig(total_iters=4, world_size=2, peak_flops=4e12)
    _run(tmp_path, [(1, 4.0), (2, float("nan")), (3, 3.0), (4, 2.0)], cfg)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["lm_loss"] == 4.0 and recs[1]["lm_loss"] is None  # NaN written as null
    assert recs[2]["lr"] == pytest.approx(3e-5)  # the first parameter group
    assert recs[2]["lr_groups"] == {"vit": pytest.approx(3e-5), "lm": pytest.approx(6e-5)}
    assert recs[3]["grad_norm"] == 2.0
    assert recs[0]["tokens_per_s"] == 500.0
    assert recs[0]["tflops_per_gpu"] == 2.0  # 8e12 FLOPs / 2 s / 2 GPUs
    assert recs[0]["mfu"] == 0.5
    assert [r["skipped_steps"] for r in recs] == [0, 1, 1, 1]
    assert [r["decode_failures"] for r in recs] == [0, 1, 1, 1]
    assert recs[3]["consumed_tokens"] == 4000 and recs[3]["tiles"] == 7
    assert recs[0]["memory_gib"] > 0
    valid = json.loads((tmp_path / "run" / "valid_metrics.jsonl").read_text())
    assert valid == {
        "iteration": 4,
        "split": "validation",
        "lm_loss": 3.5,
        "ppl": pytest.approx(math.exp(3.5)),
    }  # validation perplexity


def test_mfu_null_without_peak(tmp_path):
    out = _run(tmp_path, [(1, 4.0), (2, 3.0)], MetricsConfig(total_iters=2))
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["mfu"] is None
    assert "MFU n/a" in out


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = MetricsConfig(total_iters=4, world_size=2, peak_flops=4e12)
    _run(tmp_path, [(1, 4.0), (2, float("nan")), (3, 3.0), (4, 2.0)], cfg)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in [
        "lm loss",
        "learning-rate/vit",
        "learning-rate/lm",
        "grad-norm",
        "throughput/tokens-per-s",
        "consumed/samples",
        "consumed/tokens",
        "batch/images",
        "batch/tiles",
        "throughput/tflops-per-gpu",
        "throughput/mfu",
        "skipped-steps",
        "decode-failures",
        "time/data-wait-s",
        "memory/peak-gib",
        "lm loss validation",
    ]:
        assert tag in tags, tag

    def values(tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert values("lm loss") == [(1, 4.0), (3, 3.0), (4, 2.0)]  # the NaN step is not plotted
    assert values("learning-rate/lm") == [(i, pytest.approx(2e-5 * i)) for i in range(1, 5)]
    assert values("throughput/mfu")[0] == (1, 0.5)
    assert values("skipped-steps")[-1] == (4, 1.0)
    assert values("consumed/samples")[-1] == (4, 16.0)
    assert values("lm loss validation") == [(4, 3.5)]


def test_console_lines_every_interval(tmp_path):
    out = _run(tmp_path, [(1, 4.0), (2, 2.0), (3, 3.0), (4, 1.0)], MetricsConfig(total_iters=4, world_size=2))
    lines = [line for line in out.splitlines() if "step " in line and "eta" in line]
    assert len(lines) == 2
    assert "step 2/4" in lines[0] and "loss (mean of 2 steps) 3.0000" in lines[0]
    assert "eta 0:00:04" in lines[0]  # two steps left at 2 s each
    assert "tokens/s 500" in lines[0] and "TFLOP/s/GPU 2.00" in lines[0]
    assert "data wait 250.0 ms" in lines[0] and "grad norm 1.000" in lines[0]
    assert "step 4/4" in lines[1] and "eta 0:00:00" in lines[1]
    assert "validation lm loss 3.5000" in out


def test_other_ranks_write_nothing(tmp_path):
    out = _run(tmp_path, [(1, 4.0), (2, 3.0)], MetricsConfig(), rank=1)
    assert out == ""
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()


def test_resume_drops_lines_after_checkpoint(tmp_path):
    _run(tmp_path, [(1, 4.0), (2, 3.0), (3, 2.5)], MetricsConfig())
    _run(tmp_path, [(3, 2.0), (4, 1.5)], MetricsConfig(start_iteration=2))
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["lm_loss"]) for r in recs] == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.5)]


def test_progress_bar(tmp_path):
    out = _run(tmp_path, [(1, 4.0), (2, 3.0)], MetricsConfig(total_iters=2, progress_bar=True), terminal=True)
    assert "2/2" in out and "step 2/2" in out


def test_progress_bar_off_a_terminal_is_the_interval_lines_only(tmp_path):
    """Under nohup or CI the bar would be one carriage-return line growing for hours."""
    out = _run(tmp_path, [(1, 4.0), (2, 3.0)], MetricsConfig(total_iters=2, progress_bar=True))
    assert "\r" not in out and "it/s" not in out and "step/s" not in out
    assert "loss (mean of 2 steps) 3.5000" in out


def test_stopwatch():
    calls = []
    sw = Stopwatch(sync=lambda: calls.append(1))
    with sw.section("a"):
        pass
    sw.add("a", 1.0)
    sw.add("b", 0.5)
    totals = sw.reset()
    assert totals["a"] >= 1.0 and totals["b"] == 0.5 and len(calls) == 2
    assert sw.reset() == {}


def test_vision_timing_hooks():
    """Forward and backward of the vision part are timed; the model's gradients are unchanged."""
    import time

    import torch

    class SleepGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            time.sleep(0.05)
            return g

    class Slow(torch.nn.Module):
        def __init__(self, delay):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.delay = delay

        def forward(self, pixels):
            time.sleep(self.delay)
            return SleepGrad.apply(self.lin(pixels.flatten(1)))  # backward sleeps 50 ms

    torch.manual_seed(0)
    enc, proj, lm = Slow(0.03), torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

    def step(pixels):
        lm(proj(enc(pixels=pixels))).sum().backward()
        return [p.grad.clone() for p in enc.parameters()]

    pixels = torch.randn(2, 1, 2, 2)
    ref = step(pixels)
    for m in (enc, proj, lm):
        m.zero_grad()
    sw = Stopwatch()
    timing = VisionTiming(enc, proj, sw)
    got = step(pixels)
    timing.remove()
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    t = sw.reset()
    assert 0.03 <= t["vit_fwd"] < 0.5
    assert 0.05 <= t["vit_bwd"] < 0.5


def test_validation_of_an_init_from_checkpoint_names_the_checkpoint(tmp_path):
    """--init-from CKPT --train-iters 0 validates CKPT's weights: the line names iter_0001000,
    not this run's step 0; valid_metrics.jsonl records the folder."""
    out = io.StringIO()
    ckpt = tmp_path / "checkpoints" / "iter_0001000"
    with MetricsWriter(tmp_path / "run", None, 1, 0, MetricsConfig(), stream=out) as w:
        w.log_eval(0, 2.0, checkpoint=str(ckpt))
    assert "[eval] checkpoint iter_0001000 | validation lm loss 2.0000" in out.getvalue()
    assert "step 0" not in out.getvalue()
    [rec] = [json.loads(line) for line in (tmp_path / "run" / "valid_metrics.jsonl").read_text().splitlines()]
    assert rec["checkpoint"] == str(ckpt) and rec["iteration"] == 0


def test_progress_bar_labels_its_loss_as_this_steps(tmp_path):
    """The bar shows the step's own loss, the log line the interval mean; each says which."""
    out = _run(tmp_path, [(1, 4.0), (2, 2.0)], MetricsConfig(total_iters=2, progress_bar=True), terminal=True)
    assert "loss (this step) 2.0000" in out
    assert "loss (mean of 2 steps) 3.0000" in out
