"""Using an export without torchvision, and the routes that cannot work (issue 22).

A tiny InternVL checkpoint goes hf-to-mcore -> mcore-to-hf (the default transformers layout).
``ExportProcessor`` builds the inputs InternVLProcessor would (AutoTokenizer + AutoImageProcessor
+ image-token expansion): the same prompt ids and tiles as our generate path builds for the
Megatron checkpoint, the same transformers logits, and the same greedy tokens as
``python -m megatron_sail.generate`` (and, where torchvision imports, the same ids and pixels as
AutoProcessor itself). ``--layout chat`` of a checkpoint without remote code fails in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_sail.convert.hf_processor import ExportProcessor

PROMPT = "What shape is in the picture?"


@pytest.fixture(scope="module")
def export(tmp_path_factory, repo_root, subprocess_env):
    """A tiny transformers-layout model, its Megatron conversion (no source_files/: what a model
    trained from scratch has) and its export, plus a 2:1 image (2x1 grid + thumbnail)."""
    d = tmp_path_factory.mktemp("export")
    steps = [
        ("make_tiny_hf_checkpoint", ["--out", str(d / "hf"), "--tokenizer", "--vocab-size", "320"]),
        ("convert_checkpoint", ["hf-to-mcore", "--hf-dir", str(d / "hf"), "--out", str(d / "mc")]),
        ("convert_checkpoint", ["mcore-to-hf", "--mcore-dir", str(d / "mc"), "--out", str(d / "export")]),
    ]
    code = (
        f"import importlib\nfor mod, argv in {steps!r}:\n"
        "    assert importlib.import_module(mod).main(argv) in (0, None), mod\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, env=subprocess_env, check=True, capture_output=True
    )  # one process: the tools import by name (testkit's path)
    image = d / "wide.png"
    Image.fromarray((np.random.RandomState(0).rand(56, 112, 3) * 255).astype("uint8")).save(image)
    return {"dir": d, "mc": d / "mc", "export": d / "export", "image": image}


def _ours(export):
    """Prompt ids and tiles as our generate path builds them for the Megatron checkpoint."""
    from megatron_sail.data.tokenizer import load_tokenizer
    from megatron_sail.inference import inspect_checkpoint
    from megatron_sail.inference.config import GenerationRequest
    from megatron_sail.inference.prompts import PromptBuilder

    ck = inspect_checkpoint(export["mc"])
    builder = PromptBuilder(load_tokenizer(ck.tokenizer_path), ck.settings, ck.settings.max_tiles)
    return builder.build(GenerationRequest(prompt=PROMPT, images=[str(export["image"])]), 8)


def _helper_inputs(export):
    processor = ExportProcessor.from_pretrained(export["export"])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return processor, processor(images=[str(export["image"])], text=text)


def test_inputs_match_our_generate_path_and_give_the_same_logits(export):
    from transformers import AutoModelForImageTextToText

    processor, inputs = _helper_inputs(export)
    ours = _ours(export)
    ids = inputs["input_ids"][0].tolist()
    assert ids == ours.ids
    assert ids.count(processor.image_token_id) == 3 * 4  # 2x1 grid + thumbnail, 4 tokens per tile
    assert inputs["pixel_values"].shape == ours.tiles.shape == (3, 3, 56, 56)
    assert torch.allclose(inputs["pixel_values"], ours.tiles, atol=1e-5)
    model = AutoModelForImageTextToText.from_pretrained(str(export["export"])).eval()
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    with torch.no_grad():
        helper = model(**inputs).logits
        reference = model(input_ids=torch.tensor([ours.ids]), pixel_values=ours.tiles).logits
    assert torch.allclose(helper, reference, atol=1e-5)


def test_transformers_on_the_helper_inputs_generates_what_our_generator_does(
    export, repo_root, subprocess_env
):
    """Greedy, 4 tokens forced (the random model may stop at once): same prompt, same tokens."""
    from transformers import AutoModelForImageTextToText

    out = export["dir"] / "ours.jsonl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_sail.generate",
            "--checkpoint",
            str(export["mc"]),
            "--image",
            str(export["image"]),
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "6",
            "--min-new-tokens",
            "4",
            "--output",
            str(out),
        ],
        cwd=repo_root,
        env=subprocess_env,
        check=True,
        capture_output=True,
    )
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    _, inputs = _helper_inputs(export)
    model = AutoModelForImageTextToText.from_pretrained(str(export["export"])).eval()
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=4, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1] :].tolist()
    if new and new[-1] in model.generation_config.eos_token_id:
        new = new[:-1]
    assert record["prompt_ids"] == inputs["input_ids"][0].tolist()
    assert record["token_ids"] == new and len(new) >= 4


def test_batches_pad_left_and_placeholders_must_match_the_images(export):
    processor, single = _helper_inputs(export)
    text = processor.decode(single["input_ids"][0])
    short = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    long = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    batch = processor(images=[[str(export["image"])], [str(export["image"])]], text=[short, long])
    assert batch["pixel_values"].shape[0] == 6
    assert batch["input_ids"][1].tolist() == single["input_ids"][0].tolist()
    pad = int((batch["attention_mask"][0] == 0).sum())
    assert pad > 0 and batch["attention_mask"][0, :pad].sum() == 0  # padded on the left
    assert "<img>" in text and "</img>" in text
    with pytest.raises(ValueError, match="1 <IMG_CONTEXT> placeholder\\(s\\) for 2 image\\(s\\)"):
        processor(images=[str(export["image"])] * 2, text=long)


def test_auto_processor_builds_the_same_inputs_where_torchvision_imports(export):
    pytest.importorskip(
        "torchvision",
        reason="InternVLProcessor needs torchvision, which does not "
        "import beside the pinned CPU torch (docs/conversion.md)",
    )
    from transformers import AutoImageProcessor, AutoProcessor

    processor, inputs = _helper_inputs(export)
    auto = AutoProcessor.from_pretrained(str(export["export"]))
    auto.image_processor = AutoImageProcessor.from_pretrained(str(export["export"]), backend="pil")
    text = processor.decode(
        processor.tokenizer(
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
        )["input_ids"]
    )
    reference = auto(images=[Image.open(export["image"]).convert("RGB")], text=text, return_tensors="pt")
    assert reference["input_ids"].tolist() == inputs["input_ids"].tolist()
    assert torch.equal(reference["pixel_values"], inputs["pixel_values"])


@pytest.mark.parametrize("family", ["intern_vit", "aimv2"])
def test_layout_chat_without_remote_code_fails_in_one_line(
    export, family, tmp_path, repo_root, subprocess_env
):
    """A checkpoint with no source_files/ (trained from scratch): exit 2, one `error:` line
    that says why and what works instead; no traceback."""
    mc = export["mc"]
    if family == "aimv2":
        from megatron_sail.checkpoint.layout import write_model_config
        from megatron_sail.config.recipes import get_recipe

        mc = tmp_path / "aimv2_from_scratch"
        mc.mkdir()
        write_model_config(mc, get_recipe("sail_vl2_2b")("sft-knowledge").model)
    proc = subprocess.run(
        [
            sys.executable,
            "tools/convert_checkpoint.py",
            "mcore-to-hf",
            "--mcore-dir",
            str(mc),
            "--out",
            str(tmp_path / "chat"),
            "--layout",
            "chat",
        ],
        cwd=repo_root,
        env=subprocess_env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "source_files/" in lines[0]
    hint = "--layout hf" if family == "intern_vit" else "tools/evaluate.py"
    assert hint in lines[0]
    assert not (tmp_path / "chat").exists()
