"""Where load_generator takes tokenizer and tiling settings from, per checkpoint kind (files only)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from megatron_sail.inference import inspect_checkpoint


def _train_ckpt(root, data_path, with_files: bool):
    """A run dir with `latest` -> iter_0000005 holding train_state.pt (+ tokenizer/, processor.json)."""
    it = root / "iter_0000005"
    it.mkdir(parents=True)
    (it / "metadata.json").write_text("{}")
    torch.save(
        {"train_state": {}, "config": {"model": {}, "data": {"data_path": data_path}}}, it / "train_state.pt"
    )
    (root / "latest").write_text("5\n")
    if with_files:
        (it / "tokenizer").mkdir()
        (it / "tokenizer" / "tokenizer.json").write_text("{}")
        (it / "processor.json").write_text(
            json.dumps(
                {
                    "tile_size": 64,
                    "max_tiles": 6,
                    "min_tiles": 1,
                    "use_thumbnail": False,
                    "tokens_per_tile": 16,
                    "template": {"system_prompt": "ckpt"},
                }
            )
        )
    return it


def _meta(prefix):
    """A dataset meta.json as tools/preprocess_data.py writes it (the fields read here)."""
    (prefix.parent / (prefix.name + ".meta.json")).write_text(
        json.dumps(
            {
                "tokenizer": {"path": "/data/tok.json"},
                "tiling": {
                    "tile_size": 32,
                    "min_tiles": 1,
                    "max_tiles": 4,
                    "thumbnail": True,
                    "tokens_per_tile": 4,
                },
                "template": {"system_prompt": "meta", "turn_separator": "\n"},
            }
        )
    )


def test_training_checkpoint_files_win_over_dataset_meta(tmp_path):
    prefix = tmp_path / "data" / "train"
    prefix.parent.mkdir()
    _meta(prefix)
    it = _train_ckpt(tmp_path / "run", ["1.0", str(prefix)], with_files=True)
    ck = inspect_checkpoint(tmp_path / "run")
    assert ck.kind == "train" and ck.path == it
    assert ck.tokenizer_path == str(it / "tokenizer")
    assert (ck.settings.tile_size, ck.settings.max_tiles, ck.settings.use_thumbnail) == (64, 6, False)
    assert ck.settings.template_config().system_prompt == "ckpt"


def test_older_training_checkpoint_falls_back_to_dataset_meta(tmp_path):
    prefix = tmp_path / "data" / "train"
    prefix.parent.mkdir()
    _meta(prefix)
    _train_ckpt(tmp_path / "run", ["0.7", str(tmp_path / "missing"), "0.3", str(prefix)], with_files=False)
    ck = inspect_checkpoint(tmp_path / "run" / "iter_0000005")
    assert ck.tokenizer_path == "/data/tok.json"
    s = ck.settings
    assert (s.tile_size, s.max_tiles, s.tokens_per_tile, s.use_thumbnail) == (32, 4, 4, True)
    assert s.template_config().system_prompt == "meta"


def test_converted_checkpoint_defaults_to_model_geometry(tmp_path):
    from dataclasses import asdict

    from megatron_sail.config.model import tiny

    (tmp_path / "metadata.json").write_text("{}")
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump(asdict(tiny(vocab_size=256))))
    ck = inspect_checkpoint(tmp_path)
    assert ck.kind == "mcore" and ck.tokenizer_path is None
    assert (ck.settings.tile_size, ck.settings.tokens_per_tile, ck.settings.max_tiles) == (32, 4, 12)


def test_not_a_checkpoint_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        inspect_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        inspect_checkpoint(tmp_path / "nope")
    (tmp_path / "processor.json").write_text("[1]")
    (tmp_path / "metadata.json").write_text("{}")
    (tmp_path / "model_config.yaml").write_text("{}")
    with pytest.raises(ValueError, match="processor.json: expected a JSON object"):
        inspect_checkpoint(tmp_path)


def test_hf_folder_of_another_model_type_is_refused_naming_the_layouts(tmp_path):
    """A bare causal LM folder (or any non-VLM config) must not be read as a default InternVL."""
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64})
    )
    with pytest.raises(
        ValueError,
        match=r"config.json: model_type 'qwen3' is not a vision-language "
        r"layout.*'internvl'.*'internvl_chat'.*'sailvl'.*mcore-to-hf",
    ):
        inspect_checkpoint(tmp_path)
