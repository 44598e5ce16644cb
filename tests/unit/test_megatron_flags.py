"""Megatron-LM flags of the trainer (issue 13): each one changes what it says in the resolved
config, the LR schedule, the DDP / recompute settings or the console, and the ones we cannot
honour are refused by name."""
import json
from types import SimpleNamespace

import pytest

from megatron_sail.config.run import resolve
from megatron_sail.training.metrics import MetricsConfig, MetricsWriter, StepStats
from megatron_sail.training.optimizer import build_scheduler
from megatron_sail.training.recompute import RecomputeConfig, apply_recompute


def _lrs(cfg, steps):
    """LR of the scheduler built from cfg.optim after 0..steps-1 steps."""
    opt = SimpleNamespace(param_groups=[{"params": []}])
    sched = build_scheduler(cfg.optim, opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        sched.step(increment=1)
    return out


def test_abbreviated_flags_are_refused():
    with pytest.raises(SystemExit):
        resolve(["--lr-warmu", "5"])
    with pytest.raises(SystemExit):
        resolve(["--train-it", "5"])


def test_train_samples_sets_iterations_and_excludes_train_iters():
    cfg = resolve(["--train-samples", "100", "--global-batch-size", "8"])
    assert cfg.train.train_iters == 12  # Megatron-LM: train_samples // global_batch_size
    assert cfg.optim.lr_decay_iters == 12
    with pytest.raises(ValueError, match="exclude each other"):
        resolve(["--train-samples", "100", "--train-iters", "5"])


def test_sample_based_schedule():
    cfg = resolve(["--train-samples", "160", "--global-batch-size", "8", "--lr", "1e-3",
                   "--lr-warmup-samples", "32", "--lr-decay-samples", "80",
                   "--lr-decay-style", "linear", "--min-lr", "0"])
    assert (cfg.optim.lr_warmup_iters, cfg.optim.lr_decay_iters) == (4, 10)
    lrs = _lrs(cfg, 12)
    assert lrs[4] == pytest.approx(1e-3) and lrs[2] == pytest.approx(0.5e-3)
    assert lrs[10] == pytest.approx(0.0) and lrs[11] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="needs --train-samples"):
        resolve(["--lr-warmup-samples", "32"])
    with pytest.raises(ValueError, match="give it in rows"):
        resolve(["--train-samples", "160", "--lr-warmup-iters", "3"])
    with pytest.warns(UserWarning, match="not a multiple"):
        assert resolve(["--train-samples", "160", "--global-batch-size", "8",
                        "--lr-warmup-samples", "30"]).optim.lr_warmup_iters == 4


def test_warmup_fraction_and_init():
    cfg = resolve(["--train-iters", "40", "--lr-decay-iters", "20", "--lr-warmup-fraction",
                   "0.25", "--lr-warmup-init", "1e-4", "--lr", "1e-3"])
    assert cfg.optim.lr_warmup_iters == 5  # a fraction of the decay steps, as Megatron-LM
    lrs = _lrs(cfg, 6)
    assert lrs[0] == pytest.approx(1e-4)  # warmup starts at --lr-warmup-init, not 0
    assert lrs[5] == pytest.approx(1e-3)
    assert _lrs(resolve(["--lr-warmup-fraction", "0.25"]), 1)[0] == 0.0
    with pytest.raises(ValueError, match="excludes"):
        resolve(["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"])


def test_split_points_to_valid_data_path():
    with pytest.raises(ValueError, match="--valid-data-path"):
        resolve(["--split", "969,30,1"])


def test_ckpt_format_only_ours():
    assert resolve(["--ckpt-format", "torch_dist"]).checkpoint.ckpt_format == "torch_dist"
    for other in ("torch", "zarr", "torch_dcp"):
        with pytest.raises(ValueError, match=f"--ckpt-format '{other}'"):
            resolve(["--ckpt-format", other])


def test_transformer_impl():
    from megatron_sail.models.layer_specs import te_available
    from megatron_sail.train import use_te

    assert use_te(resolve(["--transformer-impl", "local"])) is False
    assert use_te(resolve([])) is None
    with pytest.raises(ValueError, match="--transformer-impl"):
        resolve(["--transformer-impl", "te"])
    if not te_available():
        with pytest.raises(RuntimeError, match="Transformer Engine"):
            use_te(resolve(["--transformer-impl", "transformer_engine"]))


def test_recompute_method_and_layers():
    cfg = resolve(["--recompute-granularity", "full", "--recompute-method", "block",
                   "--recompute-num-layers", "2"])
    lm_config = SimpleNamespace()
    model = SimpleNamespace(language_model=SimpleNamespace(config=lm_config), vision_model=None)
    t = cfg.train
    apply_recompute(model, RecomputeConfig(t.recompute_granularity, False, t.recompute_method,
                                           t.recompute_num_layers))
    assert (lm_config.recompute_granularity, lm_config.recompute_method,
            lm_config.recompute_num_layers) == ("full", "block", 2)
    with pytest.raises(ValueError, match="full only"):
        resolve(["--recompute-method", "uniform"])
    with pytest.raises(ValueError, match="uniform or block"):
        resolve(["--recompute-granularity", "full", "--recompute-method", "chunk"])


def test_overlap_flags_reach_ddp_config():
    from megatron_sail.train import ddp_config

    base = ddp_config(resolve([]))
    assert not base.overlap_grad_reduce and not base.overlap_param_gather  # CPU default
    on = ddp_config(resolve(["--overlap-grad-reduce", "--overlap-param-gather"]))
    assert on.overlap_grad_reduce and on.overlap_param_gather and on.bucket_size
    only_grad = ddp_config(resolve(["--overlap-grad-reduce", "--no-use-distributed-optimizer"]))
    assert only_grad.overlap_grad_reduce and not only_grad.overlap_param_gather
    with pytest.raises(ValueError, match="distributed optimizer"):
        resolve(["--overlap-param-gather", "--no-use-distributed-optimizer"])


def test_num_workers_sets_decode_threads():
    assert resolve(["--num-workers", "5"]).images.threads == 5


def test_load_flags_resolve():
    cfg = resolve(["--load", "/x", "--no-load-optim", "--no-load-rng", "--use-checkpoint-args"])
    c = cfg.checkpoint
    assert c.no_load_optim and c.no_load_rng and c.use_checkpoint_args and not c.finetune
    with pytest.raises(ValueError, match="--finetune"):
        resolve(["--finetune"])


def _write(tmp_path, cfg, steps=4, log_interval=1):
    out = []
    w = MetricsWriter(tmp_path, tmp_path / "tb", log_interval, 0, cfg,
                      stream=SimpleNamespace(write=out.append, flush=lambda: None))
    for i in range(1, steps + 1):
        w.log_step(StepStats(iteration=i, lm_loss=1.0 / i, lr={"lr/default": 1e-3}, grad_norm=1.0,
                             step_time_s=0.5, tokens=250, samples=2))
    w.close()
    return "".join(out)


def test_log_throughput_in_console(tmp_path):
    assert "tokens/s 500" in _write(tmp_path / "a", MetricsConfig(log_throughput=True))
    quiet = _write(tmp_path / "b", MetricsConfig(log_throughput=False))
    assert "loss" in quiet and "tokens/s" not in quiet and "MFU" not in quiet
    # the trainer's default is Megatron-LM's (off); the flag turns it on
    assert not resolve([]).train.log_throughput and resolve(["--log-throughput"]).train.log_throughput
    rec = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["tokens_per_s"] == 500  # metrics.jsonl keeps the numbers either way


def test_tensorboard_log_interval(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert resolve(["--tensorboard-log-interval", "3"]).train.tensorboard_log_interval == 3
    _write(tmp_path, MetricsConfig(tensorboard_log_interval=2), steps=5)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("lm loss")] == [2, 4]
