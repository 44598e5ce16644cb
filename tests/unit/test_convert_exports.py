"""mcore-to-hf writes complete folders: the InternVL-chat layout's remote code makes the round
trip (trust_remote_code loaders build the model from the export), and an export that could not
carry a usable tokenizer is refused instead of written.

The remote code is a small fixture in the shape of the hub files (remote_code_fixture.py): the
files must come back byte for byte, auto_map kept, and AutoModel(trust_remote_code=True) must
load every exported tensor into the fixture's InternVLChatModel.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_sail.checkpoint import layout
from megatron_sail.checkpoint.processor import ProcessorSettings
from megatron_sail.checkpoint.tokenizer import chat_template, save_tokenizer
from megatron_sail.convert import hf_assets, hf_io
from remote_code_fixture import AUTO_MAP, FILES, add_remote_code
from test_convert_layouts import tiny
from testkit import subprocess_env


@pytest.fixture(scope="module")
def chat_round_trip(tmp_path_factory):
    """A tiny InternVL-chat checkpoint with remote code -> hf-to-mcore -> mcore-to-hf --layout chat."""
    d = tmp_path_factory.mktemp("chat")
    src = tiny.make_tiny_checkpoint(
        d / "src", tiny.TinyCheckpointConfig(layout="chat", vocab_size=320, tokenizer=True, seed=4)
    )
    add_remote_code(src)
    (src / "README.md").write_text("model card\n")
    mc, back = d / "mc", d / "back"
    calls = [
        ["hf-to-mcore", "--hf-dir", str(src), "--out", str(mc)],
        ["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(back), "--layout", "chat"],
    ]
    code = f"import convert_checkpoint as c\nfor argv in {calls!r}: assert c.main(argv) == 0"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return src, mc, back


def test_remote_code_and_config_make_the_round_trip(chat_round_trip):
    src, mc, back = chat_round_trip
    for name in list(FILES) + ["README.md"]:
        assert (mc / layout.SOURCE_DIR / name).read_bytes() == (src / name).read_bytes(), name
        assert (back / name).read_bytes() == (src / name).read_bytes(), name
    assert hf_io.read_config(back) == hf_io.read_config(src)
    assert hf_io.read_config(back)["auto_map"] == AUTO_MAP
    expected, got = hf_io.read_state_dict(src), hf_io.read_state_dict(back)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in expected.items())
    settings = ProcessorSettings.read(back / layout.PROCESSOR_FILE)
    assert (settings.tile_size, settings.tokens_per_tile, settings.max_tiles) == (56, 4, 12)


def test_chat_export_loads_with_trust_remote_code(chat_round_trip):
    """What VLMEvalKit's SAIL-VL wrapper does: AutoModel + AutoTokenizer, trust_remote_code."""
    from transformers import AutoModel, AutoTokenizer

    _, _, back = chat_round_trip
    model, info = AutoModel.from_pretrained(str(back), trust_remote_code=True, output_loading_info=True)
    assert type(model).__name__ == "InternVLChatModel"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = hf_io.read_state_dict(back)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    tok = AutoTokenizer.from_pretrained(str(back), trust_remote_code=True)
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == hf_io.find_added_token_id(back, "<IMG_CONTEXT>")


def test_export_without_a_tokenizer_is_refused(chat_round_trip, tmp_path):
    """No tokenizer recorded and no --tokenizer: refused before any work (AutoTokenizer would
    silently build an empty tokenizer on such an export); --layout chat needs the remote code."""
    from megatron_sail.convert.checkpoint import ConvertConfig, mcore_to_hf

    _, mc, _ = chat_round_trip
    bare = tmp_path / "bare"
    shutil.copytree(mc, bare)
    shutil.rmtree(bare / "tokenizer")
    with pytest.raises(FileNotFoundError, match="records no tokenizer.*--tokenizer"):
        mcore_to_hf(bare, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="--tokenizer .*gone.json: not found"):
        mcore_to_hf(bare, tmp_path / "out", ConvertConfig(tokenizer=str(tmp_path / "gone.json")))
    shutil.copytree(mc / "tokenizer", bare / "tokenizer")
    shutil.rmtree(bare / layout.SOURCE_DIR)
    with pytest.raises(ValueError, match="--layout chat writes the hub.s remote-code layout.*--layout hf"):
        mcore_to_hf(bare, tmp_path / "out", ConvertConfig(layout="chat"))
    assert not (tmp_path / "out").exists()


def test_tokenizer_check_catches_an_empty_tokenizer(chat_round_trip, tmp_path):
    """A folder with a config but no tokenizer files: AutoTokenizer returns a one-token
    tokenizer without complaint; the export check refuses it."""
    from transformers import AutoTokenizer

    _, _, back = chat_round_trip
    (tmp_path / "config.json").write_text(json.dumps(tiny.build_hf_config(tiny.TinyCheckpointConfig())))
    assert len(AutoTokenizer.from_pretrained(str(tmp_path))) <= 1  # the silent failure
    with pytest.raises(ValueError, match="tokenizer is unusable"):
        hf_assets.check_tokenizer(tmp_path, 255)
    hf_assets.check_tokenizer(back, hf_io.find_added_token_id(back, "<IMG_CONTEXT>"))


def test_chat_template_renders_training_chatml():
    """The export's Jinja template gives the text data/template.py tokenizes (system prompt,
    separators, image placeholder), for string and list contents."""
    from jinja2 import Template

    tpl = Template(
        chat_template({"system_prompt": 'Be "brief".\nOK', "turn_separator": "\n", "image_separator": "\n"})
    )
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "<image>More"},
    ]
    assert tpl.render(messages=msgs, add_generation_prompt=True) == (
        '<|im_start|>system\nBe "brief".\nOK<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\nHi?'
        "<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>More"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = Template(chat_template({"system_prompt": ""}))
    assert (
        plain.render(messages=[{"role": "system", "content": "S"}], add_generation_prompt=False)
        == "<|im_start|>system\nS<|im_end|>\n"
    )


def test_saved_tokenizer_keeps_the_training_ids(chat_round_trip, tmp_path):
    """Template tokens missing from a tokenizer get the ids data preprocessing gave them; a
    tokenizer whose ids disagree with the model's is refused (a wrong --tokenizer)."""
    from megatron_sail.data.tokenizer import load_tokenizer

    src, _, _ = chat_round_trip
    plain = tmp_path / "plain.json"  # the fixture's tokenizer without its template tokens
    data = json.loads((src / "tokenizer.json").read_text())
    for entry in data["added_tokens"]:
        data["model"]["vocab"].pop(entry["content"], None)
    data["added_tokens"] = []
    plain.write_text(json.dumps(data))
    ours = load_tokenizer(str(plain))
    assert ours.added  # preprocessing had to add the template tokens
    ids = save_tokenizer(plain, tmp_path / "out")
    assert ids["<IMG_CONTEXT>"] == ours.special.img_context and ids["<|im_end|>"] == ours.special.im_end
    assert load_tokenizer(str(tmp_path / "out")).encode("a red circle") == ours.encode("a red circle")
    with pytest.raises(ValueError, match="other ids than the data/model"):
        save_tokenizer(src / "tokenizer.json", tmp_path / "bad", {"<IMG_CONTEXT>": 300})
