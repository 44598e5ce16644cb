"""A user's whole path: tiny HF model -> hf-to-mcore -> train a few steps -> mcore-to-hf ->
transformers loads the export as is (tokenizer, chat template, image processor, model) and
generates; the training checkpoint records its tokenizer and processor settings on its own.

The data is preprocessed with the HF model's tokenizer, a system prompt and 56 px tiles (4 tokens
per tile, at most 4 tiles), so a wrong chat template, tile size, tile limit, tokens per tile or
token id in the export changes the prompt transformers builds and fails the comparison.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from testkit import ROOT, subprocess_env

SYSTEM = "You are a careful assistant."
PROMPT = "What shape is in the picture?"


def _run(args, timeout=300):
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """hf-to-mcore, demo data in the model's tokenizer, 3 training steps, mcore-to-hf."""
    d = tmp_path_factory.mktemp("e2e")
    hf, mc = d / "hf", d / "mc"
    prep = [
        ("make_tiny_hf_checkpoint", ["--out", str(hf), "--tokenizer", "--vocab-size", "320"]),
        ("convert_checkpoint", ["hf-to-mcore", "--hf-dir", str(hf), "--out", str(mc)]),
        ("make_demo_data", ["--out", str(d / "raw"), "--samples", "24"]),
        (
            "preprocess_data",
            [
                "--input",
                str(d / "raw" / "train.jsonl"),
                "--tokenizer",
                str(hf / "tokenizer.json"),
                "--output-prefix",
                str(d / "train"),
                "--seq-length",
                "256",
                "--tile-size",
                "56",
                "--tokens-per-tile",
                "4",
                "--max-tiles",
                "4",
                "--system-prompt",
                SYSTEM,
            ],
        ),
    ]
    code = (
        f"for mod, argv in {prep!r}:\n"
        "    r = __import__(mod).main(argv)\n"
        "    assert r in (0, None), (mod, r)\n"
    )
    _run(["-c", code])
    (d / "model.yaml").write_text(
        yaml.safe_dump({"model": yaml.safe_load((mc / "model_config.yaml").read_text())})
    )
    ckpt = d / "ckpt"
    _run(
        [
            "-m",
            "megatron_sail.train",
            "--recipe",
            "tiny",
            "--stage",
            "sft-knowledge",
            "--config",
            str(d / "model.yaml"),
            "--data-path",
            str(d / "train"),
            "--init-from",
            str(mc),
            "--train-iters",
            "3",
            "--lr-decay-iters",
            "3",
            "--global-batch-size",
            "2",
            "--micro-batch-size",
            "1",
            "--seq-length",
            "256",
            "--eval-interval",
            "0",
            "--log-interval",
            "1",
            "--run-dir",
            str(d / "run"),
            "--save",
            str(ckpt),
        ]
    )
    it = ckpt / "iter_0000003"
    out = d / "export"
    _run(["tools/convert_checkpoint.py", "mcore-to-hf", "--mcore-dir", str(it), "--out", str(out)])
    image = d / "wide.png"
    from PIL import Image

    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(56, 112, 3) * 255).astype("uint8")).save(image)
    return {"dir": d, "hf": hf, "iter": it, "export": out, "image": image}


def test_training_checkpoint_records_tokenizer_and_processor(trained):
    """Without any flag: the data's tokenizer (ids as in meta.json) and tiling settings."""
    settings = json.loads((trained["iter"] / "processor.json").read_text())
    assert {
        k: settings[k] for k in ("tile_size", "max_tiles", "min_tiles", "use_thumbnail", "tokens_per_tile")
    } == {"tile_size": 56, "max_tiles": 4, "min_tiles": 1, "use_thumbnail": True, "tokens_per_tile": 4}
    assert settings["template"]["system_prompt"] == SYSTEM
    from megatron_sail.data.tokenizer import load_tokenizer

    meta = json.loads((trained["dir"] / "train.meta.json").read_text())["tokenizer"]
    tok = load_tokenizer(str(trained["iter"] / "tokenizer"))
    assert tok.special.img_context == meta["img_context_id"] and tok.special.im_end == meta["im_end_id"]
    text = "a red circle on a blue square"
    assert tok.encode(text) == load_tokenizer(str(trained["hf"] / "tokenizer.json")).encode(text)


def test_export_has_the_trained_geometry(trained):
    """Tile size, tile limits and tokens per tile of the trained model, not transformers' 448/256."""
    out = trained["export"]
    config = json.loads((out / "config.json").read_text())
    assert config["image_seq_length"] == 4
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 56, "width": 56}
    assert (pre["min_patches"], pre["max_patches"], pre["crop_to_patches"]) == (1, 4, True)
    assert json.loads((out / "processor_config.json").read_text())["image_seq_length"] == 4
    gen = json.loads((out / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert gen["eos_token_id"][0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == config["image_token_id"]
    assert tok.context_image_token == "<IMG_CONTEXT>" and tok.start_image_token == "<img>"


def _hf_inputs(export: Path, image: Path):
    """Prompt ids and pixels as transformers' InternVLProcessor builds them from the export,
    through the package's torchvision-free ExportProcessor (AutoTokenizer's chat template +
    AutoImageProcessor + the image-token expansion; tests/unit/test_export_processor.py checks
    it against AutoProcessor where torchvision imports)."""
    from megatron_sail.convert.hf_processor import ExportProcessor

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    proc = ExportProcessor.from_pretrained(export)
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[str(image)], text=text)
    return {k: inputs[k] for k in ("input_ids", "attention_mask")}, inputs["pixel_values"]


def _hf_generate(trained, max_new_tokens: int, min_new_tokens: int = 0):
    """Greedy transformers generation on the export: (prompt ids, new ids without the stop)."""
    import torch
    from transformers import AutoModelForImageTextToText

    text, pixels = _hf_inputs(trained["export"], trained["image"])
    model = AutoModelForImageTextToText.from_pretrained(str(trained["export"])).eval()
    with torch.no_grad():
        out = model.generate(
            **text,
            pixel_values=pixels,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
        )
    prompt = text["input_ids"][0].tolist()
    new = out[0, len(prompt) :].tolist()
    stops = model.generation_config.eos_token_id
    if new and new[-1] in stops:
        new = new[:-1]
    return prompt, new, pixels


def test_transformers_generates_from_the_export(trained):
    """The export loads as is and generates; its prompt is SAIL-VL's ChatML with the system
    prompt and 3 tiles (2x1 grid + thumbnail) x 4 tokens, as the training data was made."""
    prompt, new, pixels = _hf_generate(trained, 6, min_new_tokens=3)
    assert tuple(pixels.shape) == (3, 3, 56, 56)
    from megatron_sail.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(trained["iter"] / "tokenizer"))
    sp = tok.special
    expected = (
        [sp.im_start]
        + tok.encode("system\n")
        + tok.encode(SYSTEM)
        + [sp.im_end]
        + tok.encode("\n")
        + [sp.im_start]
        + tok.encode("user\n")
        + [sp.img_start]
        + [sp.img_context] * 12
        + [sp.img_end]
        + tok.encode("\n" + PROMPT)
        + [sp.im_end]
        + tok.encode("\n")
        + [sp.im_start]
        + tok.encode("assistant\n")
    )
    assert prompt == expected
    assert len(new) >= 3


def test_our_generate_on_the_training_checkpoint_matches_transformers_on_the_export(trained):
    """``python -m megatron_sail.generate`` on the training checkpoint: same prompt ids, same
    greedy tokens as transformers on the exported folder (stop tokens held back for 4 tokens:
    the briefly trained model may answer with an immediate <|im_end|>)."""
    out = trained["dir"] / "ours.jsonl"
    _run(
        [
            "-m",
            "megatron_sail.generate",
            "--checkpoint",
            str(trained["iter"]),
            "--image",
            str(trained["image"]),
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "8",
            "--min-new-tokens",
            "4",
            "--output",
            str(out),
        ]
    )
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    prompt, new, _ = _hf_generate(trained, 8, min_new_tokens=4)
    assert record["prompt_ids"] == prompt
    assert record["token_ids"] == new and len(new) >= 4


def test_auto_processor_loads_the_export(trained):
    """AutoProcessor itself (InternVLProcessor) needs torchvision in transformers 5.23 (see
    docs/conversion.md); where it imports, the processor has the model's geometry and builds
    the same prompt as the torchvision-free path."""
    pytest.importorskip(
        "torchvision",
        reason="transformers' InternVLProcessor cannot be built "
        "without torchvision; PyPI's torchvision does not import beside the pinned "
        "CPU torch 2.13.0 (a user needs torch 2.14.1 + torchvision 0.29.1)",
    )
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(trained["export"]))
    assert type(proc).__name__ == "InternVLProcessor" and proc.image_seq_length == 4
    prompt, _, _ = _hf_generate(trained, 1)
    from megatron_sail.data.tokenizer import load_tokenizer

    sp = load_tokenizer(str(trained["iter"] / "tokenizer")).special
    assert prompt.count(sp.img_context) == 12 and prompt[0] == sp.im_start
