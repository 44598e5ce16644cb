"""A new user's first hour (issue 22): outputs land where they are expected, and nothing already
there is silently overwritten."""

import importlib
import json
import os
from pathlib import Path

import pytest


def _tool(name: str):
    """A tools/ script as a module (tools/ is on pytest's pythonpath)."""
    return importlib.import_module(name)


def test_make_demo_data_refuses_a_used_folder_and_overwrite_leaves_nothing_stale(tmp_path, capsys):
    make = _tool("make_demo_data").main
    out = tmp_path / "demo"
    assert make(["--out", str(out), "--samples", "3", "--vocab-size", "300"]) == 0
    (out / "stale.png").write_bytes(b"old")
    with pytest.raises(SystemExit) as exit_info:
        make(["--out", str(out), "--samples", "3", "--vocab-size", "300"])
    assert exit_info.value.code == 2
    assert "exists and is not empty; give --overwrite" in capsys.readouterr().err
    assert (out / "stale.png").exists()  # refused: nothing touched
    assert make(["--out", str(out), "--samples", "3", "--vocab-size", "300", "--overwrite"]) == 0
    assert not (out / "stale.png").exists()
    assert len([json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]) == 3


def test_run_dir_defaults_next_to_save():
    from megatron_sail.config.run import resolve

    cfg = resolve(["--recipe", "tiny", "--save", "/exp/sft/checkpoints"])
    assert cfg.train.run_dir == "/exp/sft"
    assert cfg.train.tensorboard_dir == "/exp/sft/tensorboard"
    assert resolve(["--recipe", "tiny", "--save", "/exp/ckpt"]).train.run_dir == "/exp/ckpt"
    given = resolve(["--recipe", "tiny", "--save", "/exp/sft/checkpoints", "--run-dir", "/logs/a"])
    assert given.train.run_dir == "/logs/a"
    assert resolve(["--recipe", "tiny"]).train.run_dir == "runs/tiny"  # nothing saved


def test_the_tokenizer_is_recorded_so_a_run_from_another_folder_finds_it(tmp_path, monkeypatch):
    """Preprocessing with a relative --tokenizer used to record it relative to where it ran;
    a trainer started elsewhere then saved checkpoints without tokenizer/ (issue 22)."""
    from megatron_sail.checkpoint.assets import resolve_tokenizer_path, write_checkpoint_assets
    from megatron_sail.checkpoint.layout import TOKENIZER_DIR
    from megatron_sail.config.data import PackingConfig, PreprocessConfig
    from megatron_sail.config.images import TilingConfig
    from megatron_sail.data.preprocess.pipeline import run
    from megatron_sail.demo.generator import DemoConfig, make_demo

    demo = make_demo(str(tmp_path / "demo"), DemoConfig(samples=6, val_samples=1, seed=3))
    monkeypatch.chdir(tmp_path)
    prefix = tmp_path / "packed" / "train"
    cfg = PreprocessConfig(
        inputs=[demo["train"]],
        output_prefix=str(prefix),
        tokenizer=os.path.relpath(demo["tokenizer"], tmp_path),
        tiling=TilingConfig(32, 1, 4, True, 4),
        packing=PackingConfig(seq_length=256, packing_buffer=8, seed=7),
    )
    code, summary = run(cfg, log=lambda m: None)
    assert code == 0, summary
    meta_path = f"{prefix}.meta.json"
    recorded = json.loads(Path(meta_path).read_text())["tokenizer"]["path"]
    assert recorded == demo["tokenizer"] and os.path.isabs(recorded)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ckpt = tmp_path / "iter_1"
    ckpt.mkdir()
    write_checkpoint_assets(str(ckpt), {"data": {"data_path": [str(prefix)]}})
    assert any((ckpt / TOKENIZER_DIR).iterdir())
    with pytest.raises(
        FileNotFoundError,
        match=r"train\.meta\.json: the tokenizer it records "
        r"\(gone/tok\.json\) is not found",
    ):
        resolve_tokenizer_path(meta_path, "gone/tok.json")


def test_preprocessing_detects_the_format_per_file(tmp_path, tiny_tokenizer):
    """A glob over LLaVA and caption files read every record of the second file as a bad_sample
    of the first one's format; each file is now read as what it is, and the log says which."""
    from PIL import Image

    from megatron_sail.config.data import PackingConfig, PreprocessConfig
    from megatron_sail.config.images import TilingConfig
    from megatron_sail.data.preprocess.pipeline import run

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    llava = [
        {
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "Red."},
            ],
        }
    ] * 3
    captions = [{"image": "red.png", "caption": "A red square."}] * 2
    (tmp_path / "a_chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava))
    (tmp_path / "b_caption.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions))
    logs = []
    cfg = PreprocessConfig(
        inputs=[str(tmp_path / "*.jsonl")],
        output_prefix=str(tmp_path / "out"),
        tokenizer=tiny_tokenizer,
        tiling=TilingConfig(32, 1, 4, True, 4),
        packing=PackingConfig(seq_length=256, packing_buffer=8, seed=7),
    )
    code, summary = run(cfg, log=logs.append)
    assert code == 0, summary
    assert summary["samples"] == 5 and summary["rejects"] == {}
    assert f"format caption: 1 file(s): {tmp_path / 'b_caption.jsonl'}" in logs
    assert f"format llava: 1 file(s): {tmp_path / 'a_chat.jsonl'}" in logs
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["input_format"] == "caption+llava"
