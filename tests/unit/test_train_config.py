"""RunConfig resolution: recipe(stage) -> YAML -> flags -> derived fields; resolved config file."""

import logging

import pytest
import torch
import yaml

from megatron_sail.config.run import resolve, write_resolved
from megatron_sail.config.stage import STAGES


def test_stage_defaults_and_trainable_modules():
    cfg = resolve(["--recipe", "sail_2b", "--stage", "pretrain-alignment", "--train-iters", "1000"])
    assert (cfg.stage.train_vision, cfg.stage.train_projector, cfg.stage.train_language) == (
        False,
        True,
        False,
    )
    assert cfg.optim.lr == STAGES["pretrain-alignment"].lr
    assert cfg.optim.lr_warmup_iters == 30  # 3% of 1000
    assert cfg.optim.lr_decay_iters == 1000
    adv = resolve(["--recipe", "sail_2b", "--stage", "pretrain-advance", "--train-language", "true"])
    assert adv.stage.train_language and adv.stage.train_vision
    assert adv.optim.lr_decay_style == "WSD" and adv.optim.lr_wsd_decay_iters > 0
    # the paper's five training stages, then the post-training ones (docs/post_training.md)
    assert list(STAGES) == [
        "pretrain-alignment",
        "pretrain-advance",
        "sft-knowledge",
        "sft-instruction",
        "sft-preference",
        "dpo",
        "grpo",
    ]


def test_yaml_then_flags_override(tmp_path):
    y = tmp_path / "o.yaml"
    y.write_text(
        yaml.safe_dump(
            {"optim": {"lr": 0.5, "min_lr": 0.1}, "train": {"train_iters": 7}, "parallel": {"tp": 2}}
        )
    )
    cfg = resolve(
        [
            "--recipe",
            "tiny",
            "--config",
            str(y),
            "--lr",
            "0.25",
            "--data-path",
            "1",
            "a",
            "2",
            "b",
            "--sequence-parallel",
            "--save",
            "/tmp/x",
            "--vit-lr-mult",
            "0.1",
        ]
    )
    assert cfg.optim.lr == 0.25 and cfg.optim.min_lr == 0.1  # flag beats YAML
    assert cfg.train.train_iters == 7 and cfg.parallel.tp == 2 and cfg.parallel.sp
    assert cfg.data.data_path == ["1", "a", "2", "b"]
    assert cfg.checkpoint.save == "/tmp/x" and cfg.optim.vit_lr_mult == 0.1


def test_bad_yaml_key_names_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("optim:\n  learning_rate: 1.0\n")
    with pytest.raises(ValueError, match="bad.yaml.*learning_rate"):
        resolve(["--config", str(y)])
    y.write_text("train:\n  train_iters: lots\n")
    with pytest.raises(ValueError, match="train_iters"):
        resolve(["--config", str(y)])


def test_virtual_pipeline_flag_and_checks():
    cfg = resolve(
        [
            "--recipe",
            "sail_8b",
            "--pipeline-model-parallel-size",
            "2",
            "--num-layers-per-virtual-pipeline-stage",
            "7",
        ]
    )
    assert cfg.parallel.vpp == 2  # 28 layers / (2 stages x 7)
    with pytest.raises(ValueError, match="virtual"):
        resolve(["--recipe", "sail_8b", "--num-layers-per-virtual-pipeline-stage", "5"])
    with pytest.raises(ValueError, match="micro-batch"):
        resolve(["--global-batch-size", "5", "--micro-batch-size", "2"])
    with pytest.raises(ValueError, match="fp8"):
        resolve(["--fp8-format", "e5m2"])
    with pytest.raises(ValueError, match="unknown stage"):
        resolve(["--stage", "pretrain"])


def test_resolved_config_written(tmp_path):
    cfg = resolve(["--recipe", "tiny", "--train-iters", "3"])
    path = write_resolved(cfg, str(tmp_path / "run"))
    data = yaml.safe_load(open(path))
    assert data["train"]["train_iters"] == 3 and data["recipe"] == "tiny"
    assert data["stage"]["name"] == "sft-knowledge"
    assert not (tmp_path / "run" / "config.yaml.tmp").exists()


def test_precision_flags_on_cpu(monkeypatch, caplog):
    """Without CUDA: --bf16 falls back to fp32 with a warning, --fp8-format stops with a reason;
    with CUDA, --bf16 gives bf16 parameters."""
    from megatron_sail.platform import distributed as platform
    from megatron_sail.training.precision import check_precision

    monkeypatch.setattr(platform, "has_cuda", lambda: False)
    assert check_precision(resolve(["--recipe", "tiny"])) == torch.float32
    with caplog.at_level(logging.WARNING, logger="megatron_sail"):
        assert check_precision(resolve(["--recipe", "tiny", "--bf16"])) == torch.float32
    assert "--bf16 ignored on CPU" in caplog.text
    with pytest.raises(SystemExit, match="--fp8-format hybrid: FP8 needs Transformer Engine"):
        check_precision(resolve(["--recipe", "tiny", "--fp8-format", "hybrid"]))
    monkeypatch.setattr(platform, "has_cuda", lambda: True)
    assert check_precision(resolve(["--recipe", "tiny", "--bf16"])) == torch.bfloat16


def test_fp8_checks_on_gpu(monkeypatch):
    """With CUDA: FP8 needs TE, --bf16 and 16-aligned LM tokens per rank and micro-batch."""
    from megatron_sail.models import layer_specs
    from megatron_sail.platform import distributed as platform
    from megatron_sail.training.precision import check_precision

    monkeypatch.setattr(platform, "has_cuda", lambda: True)
    fp8 = ["--recipe", "tiny", "--fp8-format", "hybrid", "--seq-length", "256"]
    monkeypatch.setattr(layer_specs, "te_available", lambda: False)
    with pytest.raises(SystemExit, match="Transformer Engine is not importable"):
        check_precision(resolve(fp8 + ["--bf16"]))
    monkeypatch.setattr(layer_specs, "te_available", lambda: True)
    with pytest.raises(SystemExit, match="needs --bf16"):
        check_precision(resolve(fp8))
    assert check_precision(resolve(fp8 + ["--bf16"])) == torch.bfloat16
    with pytest.raises(SystemExit, match="72 LM tokens per rank"):  # 1 x 72
        check_precision(resolve(fp8 + ["--bf16", "--seq-length", "72", "--micro-batch-size", "1"]))
    with pytest.raises(SystemExit, match="fp8-recipe"):
        check_precision(resolve(fp8 + ["--bf16", "--fp8-recipe", "linear"]))


def test_recompute_flags_resolve():
    cfg = resolve(["--recompute-granularity", "selective", "--recompute-vit"])
    assert cfg.train.recompute_granularity == "selective" and cfg.train.recompute_vit
    with pytest.raises(ValueError, match="recompute-granularity"):
        resolve(["--recompute-granularity", "block"])


def test_async_save_flag_resolves_silently():
    """--async-save switches the background writer on (Megatron-LM scripts pass it); neither
    form of the flag warns."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve(["--recipe", "tiny", "--async-save"]).checkpoint.async_save
        assert not resolve(["--recipe", "tiny"]).checkpoint.async_save
