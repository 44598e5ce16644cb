"""hf -> mcore -> hf through tools/convert_checkpoint.py reproduces every tensor bit for bit.

Covers both input layouts (transformers' InternVL and SAIL-VL's InternVL-chat, the latter
sharded and in bf16) and tied embeddings. The tools run as subprocesses, as users run them.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sail.convert import hf_io, internvl_chat
from test_convert_layouts import tiny
from testkit import subprocess_env


def _round_trip(tmp_path: Path, cfg, again: bool = False) -> tuple[Path, Path, Path]:
    """Make a tiny checkpoint (with a tokenizer side file), convert it to mcore and back
    (``again``: the export once more to mcore and back, into ``back2``).

    The CLI calls run in one subprocess (one interpreter start-up instead of several).
    """
    src = tiny.make_tiny_checkpoint(tmp_path / "src", cfg)
    (src / "special_tokens_map.json").write_text('{"eos_token": "<|im_end|>"}')
    mc, back = tmp_path / "mc", tmp_path / "back"
    calls = [
        ["hf-to-mcore", "--hf-dir", str(src), "--out", str(mc)],
        ["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(back)],
    ]
    if again:
        calls += [
            ["hf-to-mcore", "--hf-dir", str(back), "--out", str(tmp_path / "mc2")],
            ["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc2"), "--out", str(tmp_path / "back2")],
        ]
    code = f"import convert_checkpoint as c\nfor argv in {calls!r}: assert c.main(argv) == 0"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return src, mc, back


def _assert_bitwise(expected: dict, got: dict) -> None:
    """Same keys, dtypes and bits."""
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def _assert_te_norm_keys(mc: Path) -> None:
    """The dist checkpoint stores layer norms under Transformer Engine's names (norm fused into
    the following linear), which a TE-spec model asks for on GPUs; the local spec saved it."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(str(mc)).read_metadata().state_dict_metadata)
    for part in ("language_model.decoder", "vision_model.encoder"):
        assert f"{part}.layers.self_attention.linear_qkv.layer_norm_weight" in keys, sorted(keys)
        assert f"{part}.layers.mlp.linear_fc1.layer_norm_weight" in keys
    assert not [k for k in keys if "input_layernorm" in k or "pre_mlp_layernorm" in k]
    assert "language_model.decoder.final_layernorm.weight" in keys


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_layout_round_trip_is_bitwise(tmp_path, tied):
    src, mc, back = _round_trip(
        tmp_path,
        tiny.TinyCheckpointConfig(layout="hf", tied=tied, vocab_size=320, tokenizer=True),
        again=not tied,
    )
    _assert_bitwise(hf_io.read_state_dict(src), hf_io.read_state_dict(back))
    assert hf_io.read_config(back) == hf_io.read_config(src)
    assert (mc / "metadata.json").is_file() and (mc / "model_config.yaml").is_file()
    assert (mc / "tokenizer" / "special_tokens_map.json").is_file()
    assert (back / "special_tokens_map.json").is_file()
    _assert_te_norm_keys(mc)
    from transformers import InternVLForConditionalGeneration

    InternVLForConditionalGeneration.from_pretrained(str(back))  # loads without complaint
    if not tied:  # an export converted again exports to the same files (side files included)
        names = sorted(p.name for p in back.iterdir())
        assert "preprocessor_config.json" in names and "chat_template.jinja" in names
        assert names == sorted(p.name for p in (tmp_path / "back2").iterdir())
        for name in names:
            assert (back / name).read_bytes() == (tmp_path / "back2" / name).read_bytes(), name


def test_sharded_bf16_chat_layout_round_trip_is_bitwise(tmp_path):
    """Also with select_layer=-2: the last ViT layer, which our model does not build, comes back."""
    cfg = tiny.TinyCheckpointConfig(
        layout="chat",
        dtype="bfloat16",
        max_shard_bytes=60_000,
        seed=3,
        vision_layers=3,
        select_layer=-2,
        vocab_size=320,
        tokenizer=True,
    )
    src, mc, back = _round_trip(tmp_path, cfg)
    from safetensors.torch import load_file

    from megatron_sail.checkpoint.layout import UNUSED_FILE

    assert all(".encoder.layer.2." in k for k in load_file(mc / UNUSED_FILE))
    assert (src / hf_io.SAFETENSORS_INDEX).is_file()
    assert json.loads((mc / "conversion.json").read_text())["source_layout"] == "chat"
    # the output is transformers' layout: compare through the chat -> transformers key mapping
    expected = hf_io.to_disk_keys(internvl_chat.chat_to_hf_state_dict(hf_io.read_state_dict(src)))
    _assert_bitwise(expected, hf_io.read_state_dict(back))
    assert hf_io.read_config(back)["model_type"] == "internvl"


FAMILY_CASES = [(f, layout) for f in ("qwen3", "qwen3_moe") for layout in ("hf", "chat")]


@pytest.fixture(scope="module")
def family_round_trips(tmp_path_factory):
    """Tiny Qwen3 and Qwen3-MoE checkpoints in both layouts, each converted to mcore and back;
    all eight CLI calls in one subprocess (start-up dominates: a tiny conversion takes 0.2 s)."""
    root = tmp_path_factory.mktemp("families")
    calls, out = [], {}
    for family, layout in FAMILY_CASES:
        d = root / f"{family}_{layout}"
        src = tiny.make_tiny_checkpoint(
            d / "src",
            tiny.TinyCheckpointConfig(layout=layout, text_family=family, vocab_size=320, tokenizer=True),
        )
        calls += [
            ["hf-to-mcore", "--hf-dir", str(src), "--out", str(d / "mc")],
            ["mcore-to-hf", "--mcore-dir", str(d / "mc"), "--out", str(d / "back")],
        ]
        out[family, layout] = (src, d / "mc", d / "back")
    code = f"import convert_checkpoint as c\nfor argv in {calls!r}: assert c.main(argv) == 0"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("family,layout", FAMILY_CASES)
def test_qwen3_text_models_round_trip_bitwise_in_both_layouts(family_round_trips, family, layout):
    """Qwen3 (QK-norm weights, no qkv bias, head_dim 24 with hidden 64 / 4 heads) and Qwen3-MoE
    (router + one gate/up/down tensor per expert on disk) convert through the family specs, in
    transformers' layout and in the internvl_chat layout."""
    from megatron_sail.checkpoint.layout import read_model_config

    src, mc, back = family_round_trips[family, layout]
    expected = hf_io.read_state_dict(src)
    arch = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[family]
    if layout == "chat":
        expected = hf_io.to_disk_keys(internvl_chat.chat_to_hf_state_dict(expected))
        assert hf_io.read_config(src)["llm_config"]["architectures"] == [arch]
    _assert_bitwise(expected, hf_io.read_state_dict(back))
    assert any(k.endswith("self_attn.q_norm.weight") for k in expected)
    assert hf_io.read_config(back)["text_config"]["model_type"] == family
    lm = read_model_config(mc).language
    assert (lm.family, lm.head_dim, lm.qkv_bias) == (family, 24, False)
    if family == "qwen3_moe":
        assert "language_model.model.layers.1.mlp.experts.3.up_proj.weight" in expected
        assert "language_model.model.layers.1.mlp.gate.weight" in expected
        assert (lm.num_experts, lm.moe_router_topk, lm.expert_ffn_hidden_size) == (4, 2, 32)
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(mc)).read_metadata().state_dict_metadata
        # experts are one sharded tensor [layers, experts, out, in]: loadable at any TP/EP
        assert tuple(meta["language_model.decoder.layers.mlp.experts.experts.linear_fc1.weight"].size) == (
            2,
            4,
            64,
            64,
        )
        assert tuple(meta["language_model.decoder.layers.mlp.router.weight"].size) == (2, 4, 64)


def test_qwen3_moe_export_loads_in_transformers_with_the_same_logits(family_round_trips):
    """Both exports load with AutoModelForImageTextToText (transformers fuses the per-expert
    tensors itself) and give the logits of transformers' own load of the source checkpoint."""
    from transformers import AutoModelForImageTextToText

    from megatron_sail.convert.checkpoint import read_hf_checkpoint, transformers_config
    from megatron_sail.convert.hf_internvl import from_hf_config, to_transformers_params

    src = family_round_trips["qwen3_moe", "hf"][0]
    ref = AutoModelForImageTextToText.from_pretrained(str(src)).eval()
    ctx = hf_io.read_config(src)["image_token_id"]
    text = [i for i in range(1, 10) if i != ctx]
    ids = torch.tensor([text[:2] + [ctx] * 4 + text[2:6]])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels).logits
    # our in-memory fusion is transformers' (compare_logits loads the reference through it)
    hf = read_hf_checkpoint(src)
    fused = to_transformers_params(hf.state, from_hf_config(transformers_config(hf.config)))
    _assert_bitwise(ref.state_dict(), fused)
    for layout in ("hf", "chat"):
        back = family_round_trips["qwen3_moe", layout][2]
        model, info = AutoModelForImageTextToText.from_pretrained(str(back), output_loading_info=True)
        assert not (info["missing_keys"] or info["unexpected_keys"]), info
        assert type(model.model.language_model).__name__ == "Qwen3MoeModel"
        with torch.no_grad():
            assert torch.equal(model.eval()(input_ids=ids, pixel_values=pixels).logits, want), layout


def test_converter_refuses_an_existing_output_and_names_bad_input(tmp_path):
    from megatron_sail.convert import checkpoint

    src = tiny.make_tiny_checkpoint(tmp_path / "src", tiny.TinyCheckpointConfig())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        checkpoint.hf_to_mcore(src, tmp_path / "busy")
    with pytest.raises(FileExistsError, match="not empty"):
        checkpoint.mcore_to_hf(tmp_path / "src", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    with pytest.raises(ValueError, match="config.json.*llava"):
        checkpoint.hf_to_mcore(src, tmp_path / "mc")
    (src / "config.json").write_text(json.dumps(cfg))
    state = hf_io.read_state_dict(src)
    hf_io.write_safetensors(src, {**state, "vision_tower.extra.weight": torch.ones(2)}, 1 << 30)
    with pytest.raises(ValueError, match="no place.*vision_tower.extra.weight"):
        checkpoint.hf_to_mcore(src, tmp_path / "mc")
    with pytest.raises(FileNotFoundError, match="model_config.yaml"):
        checkpoint.mcore_to_hf(src, tmp_path / "back")
    assert not (tmp_path / "mc").exists() and not (tmp_path / "back").exists()


def test_model_config_is_read_from_a_trainer_checkpoint(tmp_path):
    from dataclasses import asdict

    from megatron_sail.checkpoint.layout import STATE_FILE, read_model_config
    from megatron_sail.config.model import tiny as tiny_model

    want = tiny_model(vocab_size=300)
    torch.save({"train_state": {}, "config": {"model": asdict(want)}}, tmp_path / STATE_FILE)
    assert read_model_config(tmp_path) == want
