"""Shared pieces of the generation tests: tiny checkpoints, images, requests, HF reference.

The reference is transformers' own ``generate`` (greedy) on the same weights, fed the prompt ids
and tiles our prompt builder made, so the comparison isolates the decoding itself.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

TOOLS = str(Path(__file__).resolve().parents[2] / "tools")
MAX_NEW = 14
MAX_TILES = 4


def make_checkpoints(root: Path) -> dict:
    """Tiny random checkpoints (with a BPE tokenizer) in both HF layouts, and test images."""
    sys.path.insert(0, TOOLS)
    from make_tiny_hf_checkpoint import TinyCheckpointConfig, make_tiny_checkpoint
    from PIL import Image

    paths = {
        "hf": make_tiny_checkpoint(root / "hf", TinyCheckpointConfig(
            layout="hf", vocab_size=300, tokenizer=True, seed=3)),
        "chat": make_tiny_checkpoint(root / "chat", TinyCheckpointConfig(
            layout="chat", vocab_size=300, tokenizer=True, seed=5, text_layers=4)),
    }
    rng = np.random.RandomState(0)
    images = []
    for k, (w, h) in enumerate([(130, 60), (50, 50), (60, 170)]):  # 2x1+thumb, 1, 1x3+thumb
        path = root / f"img{k}.png"
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(path)
        images.append(str(path))
    return {k: str(v) for k, v in paths.items()} | {"images": images}


def requests(images: list[str]):
    """Prompts of different lengths: one image, two images with placeholders, text only."""
    from megatron_sail.inference import GenerationRequest

    return [
        GenerationRequest("Describe this image in detail.", [images[0]]),
        GenerationRequest("<image>\nWhat is in the picture? <image>\na red circle on blue",
                          [images[1], images[2]]),
        GenerationRequest("What is in the picture?", []),
        GenerationRequest("a red circle", [images[2]], max_new_tokens=6),
    ]


def gen_config(**kw):
    """The generation settings every test uses (small budgets keep the tests fast)."""
    from megatron_sail.inference import GenerationConfig

    return GenerationConfig(max_new_tokens=MAX_NEW, max_tiles=MAX_TILES, **kw)


def hf_reference(ckpt_dir: str, prompts, stop_ids) -> list[list[int]]:
    """transformers' greedy generate on the checkpoint's weights for prepared prompts."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from megatron_sail.convert.checkpoint import read_hf_checkpoint, transformers_config

    hf = read_hf_checkpoint(ckpt_dir)
    model = InternVLForConditionalGeneration(transformers_config(hf.config)).float().eval()
    missing, unexpected = model.load_state_dict(hf.state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    out = []
    for p in prompts:
        ids = torch.tensor(p.ids)[None]
        kw = {"pixel_values": p.tiles} if p.tiles is not None and p.tiles.size(0) else {}
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=p.max_new_tokens, do_sample=False,
                                 eos_token_id=list(stop_ids), pad_token_id=stop_ids[0], **kw)
        new = seq[0, ids.size(1):].tolist()
        while new and new[-1] in stop_ids:
            new.pop()
        out.append(new)
    return out


def set_threads() -> None:
    """One intra-op thread per rank (the test machine has 2 cores)."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
