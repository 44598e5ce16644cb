"""HF checkpoint I/O and the InternVL-chat <-> transformers InternVL mapping (no Megatron needed)."""

import json
import os
import stat

import pytest
import torch

from megatron_sail.bench import compare_logits
from megatron_sail.convert import hf_io, internvl_chat
from megatron_sail.demo import tiny_checkpoint as tiny


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny.make_tiny_checkpoint(
        tmp_path_factory.mktemp("c") / "hf", tiny.TinyCheckpointConfig(layout="hf")
    )


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    cfg = tiny.TinyCheckpointConfig(layout="chat", max_shard_bytes=100_000)
    return tiny.make_tiny_checkpoint(tmp_path_factory.mktemp("c") / "chat", cfg)


def test_tiny_hf_checkpoint_loads_in_transformers_with_every_tensor(hf_dir):
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(str(hf_dir))
    ours = hf_io.to_module_keys(hf_io.read_state_dict(hf_dir))
    theirs = model.state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    # distinct random values: no two norm weights are equal (a swapped mapping would go unnoticed)
    norms = [v for k, v in ours.items() if "layernorm" in k and k.endswith("weight")]
    assert len(norms) >= 4 and all(not torch.equal(a, b) for a, b in zip(norms, norms[1:]))


def test_sharded_chat_checkpoint_reads_all_shards(chat_dir):
    index = json.loads((chat_dir / hf_io.SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    state = hf_io.read_state_dict(chat_dir)
    assert set(state) == set(index["weight_map"])
    assert any(k.endswith("attn.qkv.weight") for k in state) and "mlp1.0.weight" in state


def test_chat_layout_maps_to_transformers_bit_for_bit(hf_dir, chat_dir):
    hf = hf_io.to_module_keys(hf_io.read_state_dict(hf_dir))
    chat = hf_io.read_state_dict(chat_dir)
    mapped = internvl_chat.chat_to_hf_state_dict(chat)
    assert set(mapped) == set(hf)
    for k in hf:
        assert torch.equal(mapped[k], hf[k]), k
    back = internvl_chat.hf_to_chat_state_dict(mapped)
    assert set(back) == set(chat)
    for k in chat:
        assert torch.equal(back[k], chat[k]), k


def test_qkv_split_order_is_q_then_k_then_v():
    d = 4
    qkv = torch.arange(3 * d * d, dtype=torch.float32).reshape(3 * d, d)
    out = internvl_chat.chat_to_hf_state_dict({"vision_model.encoder.layers.0.attn.qkv.weight": qkv})
    pre = "model.vision_tower.encoder.layer.0.attention."
    assert torch.equal(out[pre + "q_proj.weight"], qkv[:d])
    assert torch.equal(out[pre + "k_proj.weight"], qkv[d : 2 * d])
    assert torch.equal(out[pre + "v_proj.weight"], qkv[2 * d :])


def test_chat_config_translates_to_a_loadable_transformers_config(hf_dir, chat_dir):
    from transformers import InternVLConfig

    chat = hf_io.read_config(chat_dir)
    tid = internvl_chat.resolve_image_token_id(chat, lambda t: hf_io.find_added_token_id(chat_dir, t))
    got = InternVLConfig(**internvl_chat.chat_config_to_hf(chat, tid))
    want = InternVLConfig(**hf_io.read_config(hf_dir))
    assert got.image_token_id == want.image_token_id == 255
    assert got.image_seq_length == want.image_seq_length == 4
    assert got.vision_config.to_dict() == want.vision_config.to_dict()
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_key_value_heads",
        "vocab_size",
        "rope_parameters",
        "tie_word_embeddings",
        "rms_norm_eps",
    ):
        assert getattr(got.text_config, key) == getattr(want.text_config, key), key


def test_chat_checkpoint_gives_the_same_logits_as_the_transformers_one(hf_dir, chat_dir):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    chat = hf_io.read_config(chat_dir)
    model = InternVLForConditionalGeneration(InternVLConfig(**internvl_chat.chat_config_to_hf(chat, 255)))
    model.load_state_dict(internvl_chat.chat_to_hf_state_dict(hf_io.read_state_dict(chat_dir)), strict=True)
    ref = InternVLForConditionalGeneration.from_pretrained(str(hf_dir))
    ids = torch.tensor([[1, 2, 255, 255, 255, 255, 3, 4]])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, pixel_values=pixels).logits, ref(input_ids=ids, pixel_values=pixels).logits
        )


def test_image_token_id_comes_from_the_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text(
        json.dumps(
            {"added_tokens": [{"id": 7, "content": "<img>"}, {"id": 9, "content": internvl_chat.IMG_CONTEXT}]}
        )
    )
    lookup = lambda t: hf_io.find_added_token_id(tmp_path, t)  # noqa: E731
    assert internvl_chat.resolve_image_token_id({"img_context_token_id": 3}, lookup) == 9
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        internvl_chat.resolve_image_token_id({}, lambda t: None)
    (tmp_path / "tokenizer.json").write_text('{"added_tokens": [')
    with pytest.raises(ValueError, match=r"tokenizer\.json: invalid JSON"):
        lookup(internvl_chat.IMG_CONTEXT)


def test_bad_inputs_are_named(tmp_path, chat_dir):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_io.read_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf_io.read_state_dict(tmp_path)
    with pytest.raises(ValueError, match="no known mapping.*vision_model.bogus"):
        internvl_chat.chat_to_hf_state_dict({"vision_model.bogus": torch.zeros(1)})
    cfg = hf_io.read_config(chat_dir)
    with pytest.raises(ValueError, match="ps_version"):
        internvl_chat.chat_config_to_hf({**cfg, "ps_version": "v1"}, 1)
    # a truncated shard is reported with its path
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="broken/model.safetensors"):
        hf_io.read_state_dict(broken)


def test_write_checkpoint_is_atomic_and_shards(tmp_path):
    state = {f"t{i}": torch.full((64,), float(i)) for i in range(4)}
    out = hf_io.write_checkpoint(
        tmp_path / "out", {"a": 1}, state, cfg=hf_io.HFWriteConfig(max_shard_bytes=600)
    )
    assert (out / hf_io.SAFETENSORS_INDEX).is_file()
    back = hf_io.read_state_dict(out)
    assert all(torch.equal(back[k], v) for k, v in state.items())
    with pytest.raises(FileExistsError):
        hf_io.write_checkpoint(out, {}, state)
    with pytest.raises(TypeError):  # a failing write leaves nothing behind
        hf_io.write_checkpoint(tmp_path / "bad", {"x": object()}, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_users_umask(tmp_path, umask):
    """safetensors creates its files 0600; an export takes the modes the umask gives every
    other file (issue 22), whether one file or shards."""
    old = os.umask(umask)
    try:
        state = {f"t{i}": torch.full((64,), float(i)) for i in range(4)}
        one = hf_io.write_checkpoint(tmp_path / "one", {"a": 1}, state)
        shards = hf_io.write_checkpoint(
            tmp_path / "shards", {"a": 1}, state, cfg=hf_io.HFWriteConfig(max_shard_bytes=600)
        )
    finally:
        os.umask(old)
    for folder in (one, shards):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


def test_compare_logits_prompt_is_chatml_through_the_tokenizer(tmp_path):

    cl = compare_logits
    hf = tiny.make_tiny_checkpoint(tmp_path / "hf", tiny.TinyCheckpointConfig(vocab_size=320, tokenizer=True))
    ctx = hf_io.read_config(hf)["image_token_id"]
    tok = cl.load_tokenizer(tmp_path / "missing", hf)
    assert ctx == tok.convert_tokens_to_ids(internvl_chat.IMG_CONTEXT) != 319
    ids = cl.prompt_ids(tok, "What is it?", [3, 2], ctx, 320)
    want = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<img>{internvl_chat.IMG_CONTEXT * 3}</img>\n<img>{internvl_chat.IMG_CONTEXT * 2}</img>\n"
        "What is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(ids) == want
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3 and ids.count(ctx) == 5
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        cl.prompt_ids(tok, "x", [3], ctx + 1, 320)
    with pytest.raises(ValueError, match="vocabulary"):
        cl.prompt_ids(tok, "What is it?", [1], ctx, 200)
    assert cl.load_tokenizer(tmp_path / "missing") is None


def test_compare_logits_synthetic_prompt_without_tokenizer():
    cl = compare_logits
    ids = cl.prompt_ids(None, "hi there", [4, 8], 255, 256)
    assert ids == cl.prompt_ids(None, "hi there", [4, 8], 255, 256)
    assert ids.count(255) == 12 and max(ids) < 256 and min(ids) >= 0
    runs = "".join("x" if i == 255 else "." for i in ids).split(".")
    assert sorted(len(r) for r in runs if r) == [4, 8]
