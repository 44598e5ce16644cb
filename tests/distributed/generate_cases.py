"""Shared pieces of the generation tests: tiny checkpoints, images, requests, HF reference.

The reference is transformers' own ``generate`` (greedy) on the same weights, fed the prompt ids
and tiles our prompt builder made, so the comparison isolates the decoding itself. For the
SAIL-VL2 'sailvl' layout (AIMv2 tower, which no transformers VLM class holds) it is the causal
LM's ``generate(inputs_embeds=...)`` behind transformers' AIMv2 encoder, InternVL's pixel
shuffle and projector (tools/compare_logits.py composes them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

MAX_NEW = 14
MAX_TILES = 4
FAMILIES = ("qwen3", "qwen3_moe", "qwen3_moe_chat", "sailvl")
"""Checkpoints of the newer families: Qwen3 and Qwen3-MoE in transformers' InternVL layout,
Qwen3-MoE in the InternVL-chat layout, and AIMv2 + Qwen3-MoE in SAIL-VL2's 'sailvl' layout."""


def make_checkpoints(root: Path) -> dict:
    """Tiny random checkpoints (with a BPE tokenizer): Qwen2 in both HF layouts, the FAMILIES
    folders, and test images."""
    from PIL import Image

    from megatron_sail.demo.tiny_checkpoint import TinyCheckpointConfig, make_tiny_checkpoint

    paths = {
        "hf": make_tiny_checkpoint(
            root / "hf", TinyCheckpointConfig(layout="hf", vocab_size=300, tokenizer=True, seed=3)
        ),
        "chat": make_tiny_checkpoint(
            root / "chat",
            TinyCheckpointConfig(layout="chat", vocab_size=300, tokenizer=True, seed=5, text_layers=4),
        ),
        "qwen3": make_tiny_checkpoint(
            root / "qwen3",
            TinyCheckpointConfig(layout="hf", vocab_size=300, tokenizer=True, seed=7, text_family="qwen3"),
        ),
        "qwen3_moe": make_tiny_checkpoint(
            root / "qwen3_moe",
            TinyCheckpointConfig(
                layout="hf", vocab_size=300, tokenizer=True, seed=7, text_family="qwen3_moe"
            ),
        ),
        "qwen3_moe_chat": make_tiny_checkpoint(
            root / "qwen3_moe_chat",
            TinyCheckpointConfig(
                layout="chat", vocab_size=300, tokenizer=True, seed=9, text_family="qwen3_moe"
            ),
        ),
    }
    paths["sailvl"] = make_sailvl(root / "sailvl", paths["qwen3_moe"])
    rng = np.random.RandomState(0)
    images = []
    for k, (w, h) in enumerate([(130, 60), (50, 50), (60, 170)]):  # 2x1+thumb, 1, 1x3+thumb
        path = root / f"img{k}.png"
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(path)
        images.append(str(path))
    return {k: str(v) for k, v in paths.items()} | {"images": images}


def make_sailvl(out: Path, lm_from: Path) -> Path:
    """A SAIL-VL2 hub folder ('sailvl'): the tiny AIMv2 tower of tests/unit/test_convert_sailvl.py
    in Apple's tensor names (32 px tiles, patch 8, select_layer -2: 4 tokens per tile), a random
    projector, and the Qwen3-MoE LM and tokenizer of the transformers-layout folder ``lm_from``."""
    import torch

    import test_convert_sailvl as sv
    from megatron_sail.convert import hf_io

    text = json.loads((Path(lm_from) / "config.json").read_text())["text_config"]
    state = {
        k: v.float()
        for k, v in sv.hub_tensors(text["vocab_size"], seed=4).items()
        if k.startswith("vision_model.")
    }
    g = torch.Generator().manual_seed(4)
    h, d4 = text["hidden_size"], 4 * sv.D
    r = lambda *shape: 0.1 * torch.randn(*shape, generator=g)  # noqa: E731
    state.update(
        {
            "mlp1.0.weight": 1 + r(d4),
            "mlp1.0.bias": r(d4),
            "mlp1.1.weight": r(h, d4),
            "mlp1.1.bias": r(h),
            "mlp1.3.weight": r(h, h),
            "mlp1.3.bias": r(h),
        }
    )
    for key, value in hf_io.to_module_keys(hf_io.read_state_dict(lm_from)).items():
        if key.startswith("model.language_model."):
            state["language_model.model." + key[len("model.language_model.") :]] = value
        elif key == "lm_head.weight":
            state["language_model.lm_head.weight"] = value
    config = sv.hub_config(text["vocab_size"])
    config.update(torch_dtype="float32", llm_config=dict(text, architectures=["Qwen3MoeForCausalLM"]))
    out.mkdir()
    hf_io.write_safetensors(out, state, max_shard_bytes=5 * 1024**3)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    hf_io.copy_tokenizer_files(lm_from, out)
    return out


def requests(images: list[str]):
    """Prompts of different lengths: one image, two images with placeholders, text only."""
    from megatron_sail.inference import GenerationRequest

    return [
        GenerationRequest("Describe this image in detail.", [images[0]]),
        GenerationRequest(
            "<image>\nWhat is in the picture? <image>\na red circle on blue", [images[1], images[2]]
        ),
        GenerationRequest("What is in the picture?", []),
        GenerationRequest("a red circle", [images[2]], max_new_tokens=6),
    ]


def gen_config(**kw):
    """The generation settings every test uses (small budgets keep the tests fast)."""
    from megatron_sail.inference import GenerationConfig

    return GenerationConfig(max_new_tokens=MAX_NEW, max_tiles=MAX_TILES, **kw)


def hf_reference(ckpt_dir: str, prompts, stop_ids, min_new_tokens: int = 0) -> list[list[int]]:
    """transformers' greedy generate on the checkpoint's weights for prepared prompts."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from megatron_sail.convert.checkpoint import read_hf_checkpoint, transformers_config
    from megatron_sail.convert.hf_internvl import from_hf_config, to_transformers_params

    hf = read_hf_checkpoint(ckpt_dir)
    if hf.model_config is not None:  # sailvl: no transformers VLM class holds an AIMv2 tower
        return _composed_reference(hf, prompts, stop_ids, min_new_tokens)
    config = transformers_config(hf.config)
    model = InternVLForConditionalGeneration(config).float().eval()
    state = to_transformers_params(hf.state, from_hf_config(config))  # MoE: experts fused
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    out = []
    for p in prompts:
        ids = torch.tensor(p.ids)[None]
        kw = {"pixel_values": p.tiles} if p.tiles is not None and p.tiles.size(0) else {}
        with torch.no_grad():
            seq = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=p.max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=False,
                eos_token_id=list(stop_ids),
                pad_token_id=stop_ids[0],
                **kw,
            )
        out.append(_strip(seq[0, ids.size(1) :].tolist(), stop_ids))
    return out


def _composed_reference(hf, prompts, stop_ids, min_new_tokens: int = 0) -> list[list[int]]:
    """Greedy generate of transformers' causal LM on the composed AIMv2 + projector embeddings
    (with inputs_embeds alone, ``generate`` returns only the new tokens)."""
    import torch

    from megatron_sail.bench.compare_logits import composed_reference

    embed, lm = composed_reference(hf, torch.float32, torch.device("cpu"))
    out = []
    for p in prompts:
        ids = torch.tensor(p.ids)[None]
        with torch.no_grad():
            seq = lm.generate(
                inputs_embeds=embed(ids, p.tiles),
                attention_mask=torch.ones_like(ids),
                max_new_tokens=p.max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=False,
                eos_token_id=list(stop_ids),
                pad_token_id=stop_ids[0],
            )
        out.append(_strip(seq[0].tolist(), stop_ids))
    return out


def _strip(new: list[int], stop_ids) -> list[int]:
    """Generated ids without the trailing stop token(s)."""
    while new and new[-1] in stop_ids:
        new.pop()
    return new


def set_threads() -> None:
    """One intra-op thread per rank (the test machine has 2 cores)."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
