"""Megatron-LM flags of the trainer (issue 13): each one changes what it says in the resolved
config, the LR schedule, the DDP / recompute settings or the console, and the ones we cannot
honour are refused by name."""

import json
import logging
from types import SimpleNamespace

import pytest

from megatron_sail.checkpoint.from_checkpoint import resolve
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


def test_sample_based_schedule(caplog):
    cfg = resolve(
        [
            "--train-samples",
            "160",
            "--global-batch-size",
            "8",
            "--lr",
            "1e-3",
            "--lr-warmup-samples",
            "32",
            "--lr-decay-samples",
            "80",
            "--lr-decay-style",
            "linear",
            "--min-lr",
            "0",
        ]
    )
    assert (cfg.optim.lr_warmup_iters, cfg.optim.lr_decay_iters) == (4, 10)
    lrs = _lrs(cfg, 12)
    assert lrs[4] == pytest.approx(1e-3) and lrs[2] == pytest.approx(0.5e-3)
    assert lrs[10] == pytest.approx(0.0) and lrs[11] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="needs --train-samples"):
        resolve(["--lr-warmup-samples", "32"])
    with pytest.raises(ValueError, match="give it in rows"):
        resolve(["--train-samples", "160", "--lr-warmup-iters", "3"])
    with caplog.at_level(logging.WARNING, logger="megatron_sail"):
        assert (
            resolve(
                ["--train-samples", "160", "--global-batch-size", "8", "--lr-warmup-samples", "30"]
            ).optim.lr_warmup_iters
            == 4
        )
    assert "not a multiple" in caplog.text


def test_warmup_fraction_and_init():
    cfg = resolve(
        [
            "--train-iters",
            "40",
            "--lr-decay-iters",
            "20",
            "--lr-warmup-fraction",
            "0.25",
            "--lr-warmup-init",
            "1e-4",
            "--lr",
            "1e-3",
        ]
    )
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
    from megatron_sail.training.model_setup import use_te

    assert use_te(resolve(["--transformer-impl", "local"])) is False
    assert use_te(resolve([])) is None
    with pytest.raises(ValueError, match="--transformer-impl"):
        resolve(["--transformer-impl", "te"])
    if not te_available():
        with pytest.raises(RuntimeError, match="Transformer Engine"):
            use_te(resolve(["--transformer-impl", "transformer_engine"]))


def test_recompute_method_and_layers():
    cfg = resolve(
        ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"]
    )
    lm_config = SimpleNamespace()
    model = SimpleNamespace(language_model=SimpleNamespace(config=lm_config), vision_model=None)
    t = cfg.train
    apply_recompute(
        model, RecomputeConfig(t.recompute_granularity, False, t.recompute_method, t.recompute_num_layers)
    )
    assert (lm_config.recompute_granularity, lm_config.recompute_method, lm_config.recompute_num_layers) == (
        "full",
        "block",
        2,
    )
    with pytest.raises(ValueError, match="full only"):
        resolve(["--recompute-method", "uniform"])
    with pytest.raises(ValueError, match="uniform or block"):
        resolve(["--recompute-granularity", "full", "--recompute-method", "chunk"])


def test_overlap_flags_reach_ddp_config():
    from megatron_sail.training.model_setup import ddp_config

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
    cfg = resolve(["--load", "/x", "--no-load-optim", "--no-load-rng"])
    c = cfg.checkpoint
    assert c.no_load_optim and c.no_load_rng and not c.finetune
    with pytest.raises(ValueError, match="--finetune"):
        resolve(["--finetune"])


def _write(tmp_path, cfg, steps=4, log_interval=1):
    out = []
    w = MetricsWriter(
        tmp_path,
        tmp_path / "tb",
        log_interval,
        0,
        cfg,
        stream=SimpleNamespace(write=out.append, flush=lambda: None),
    )
    for i in range(1, steps + 1):
        w.log_step(
            StepStats(
                iteration=i,
                lm_loss=1.0 / i,
                lr={"lr/default": 1e-3},
                grad_norm=1.0,
                step_time_s=0.5,
                tokens=250,
                samples=2,
            )
        )
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


def _converted(tmp_path, change):
    """A folder shaped like hf-to-mcore output: metadata.json + model_config.yaml of the tiny
    model after ``change``."""
    import dataclasses

    import yaml

    from megatron_sail.config.recipes import get_recipe

    model = get_recipe("tiny")().model
    change(model)
    ckpt = tmp_path / "hf_converted"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(model)))
    return ckpt, model


def _bigger(model):
    model.language.num_layers += 2
    model.vision.hidden_size *= 2


def test_use_checkpoint_args_takes_the_model_from_the_checkpoint(tmp_path):
    import yaml

    ckpt, model = _converted(tmp_path, _bigger)
    plain = resolve(["--recipe", "tiny", "--init-from", str(ckpt)])
    assert plain.model.language.num_layers == model.language.num_layers - 2  # the recipe's
    cfg = resolve(["--recipe", "tiny", "--init-from", str(ckpt), "--use-checkpoint-args"])
    assert cfg.model.language.num_layers == model.language.num_layers
    assert cfg.model.vision.hidden_size == model.vision.hidden_size
    yml = tmp_path / "o.yaml"
    yml.write_text(yaml.safe_dump({"model": {"language": {"num_layers": 1}}}))
    with pytest.raises(
        ValueError,
        match=r"language.num_layers: .*o.yaml 1, checkpoint "
        f"{model.language.num_layers}",
    ):
        resolve(["--init-from", str(ckpt), "--use-checkpoint-args", "--config", str(yml)])
    with pytest.raises(ValueError, match="no checkpoint"):
        resolve(["--init-from", str(tmp_path / "none"), "--use-checkpoint-args"])


def test_no_load_rng_keeps_the_seeded_rng(tmp_path, monkeypatch):
    from megatron_sail.training import checkpoint as ckpt

    (tmp_path / ckpt.STATE_FILE).write_bytes(b"")
    payload = {"train_state": {"iteration": 3, "world": {"tp": 1}, "rng": {0: "saved"}}}
    restored = []
    monkeypatch.setattr(ckpt, "read_state_file", lambda path: payload)
    monkeypatch.setattr(ckpt, "world_sizes", lambda: {"tp": 1})
    monkeypatch.setattr(ckpt, "set_rng_state", restored.append)
    monkeypatch.setattr(ckpt.torch.distributed, "get_rank", lambda: 0)
    assert ckpt._read_train_state(str(tmp_path), load_rng=False).iteration == 3
    assert restored == []
    ckpt._read_train_state(str(tmp_path), load_rng=True)
    assert restored == ["saved"]


def test_model_from_checkpoint_by_default_and_checked_with_a_recipe(tmp_path):
    from megatron_sail.checkpoint.from_checkpoint import check_model

    ckpt, model = _converted(tmp_path, _bigger)
    cfg = resolve(["--init-from", str(ckpt)])  # no --recipe: the checkpoint's model
    assert cfg.model.language.num_layers == model.language.num_layers
    check_model(cfg, log=lambda line: None)
    explicit = resolve(["--recipe", "tiny", "--init-from", str(ckpt)])
    with pytest.raises(
        ValueError,
        match=f"language.num_layers: run {model.language.num_layers - 2}, "
        f"checkpoint {model.language.num_layers}",
    ) as e:
        check_model(explicit)
    assert "vision.hidden_size" in str(e.value) and "--use-checkpoint-args" in str(e.value)


def test_non_weight_differences_are_noted_not_refused(tmp_path):
    from megatron_sail.checkpoint.from_checkpoint import check_model

    def rope(model):
        model.language.rope_theta = 123.0

    ckpt, _ = _converted(tmp_path, rope)
    lines = []
    check_model(resolve(["--recipe", "tiny", "--init-from", str(ckpt)]), log=lines.append)
    assert len(lines) == 1 and "language.rope_theta is 10000.0 in this run, 123.0" in lines[0]


def test_log_images_writes_tensorboard_image_summaries(tmp_path):
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert resolve([]).train.log_images == 0 and resolve(["--log-images", "2"]).train.log_images == 2
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    tiles = torch.zeros(4, 3, 8, 8)
    tiles[1] = 2.0  # image 0 = tiles 0-1 (grid + thumbnail): its thumbnail de-normalizes to 1.0
    tiles[2] = -2.0  # image 1 = tile 2 only: 0.0
    batch = SimpleNamespace(
        tiles=tiles,
        tokens=torch.tensor([[7, 9, 9, 8, 5, 9, 6, 1]]),
        image_spans=[(0, 0, 4, 2), (0, 4, 8, 1), (0, 4, 8, 1)],
    )
    w = MetricsWriter(tmp_path, tmp_path / "tb", 1, 0, MetricsConfig())
    n = w.log_images(3, batch, lambda ids: "-".join(map(str, ids)), mean, std, 9, count=2)
    w.close()
    assert n == 2
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == ["samples/image0", "samples/image1"]
    texts = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]}
    assert texts == {"samples/text0/text_summary": "7-8", "samples/text1/text_summary": "5-6-1"}
    import io

    from PIL import Image

    png = acc.Images("samples/image0")[0].encoded_image_string
    assert Image.open(io.BytesIO(png)).getpixel((0, 0)) == (255, 255, 255)
    png = acc.Images("samples/image1")[0].encoded_image_string
    assert Image.open(io.BytesIO(png)).getpixel((0, 0)) == (0, 0, 0)
