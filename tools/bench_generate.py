#!/usr/bin/env python
"""Generation speed on this machine: our Generator vs transformers' generate, same random weights.

    python tools/bench_generate.py --shape tiny
    python tools/bench_generate.py --shape 2b --lm-layers 4 --vit-layers 4 --new-tokens 16

Builds a random InternVL of the chosen shape (``2b``: SAIL-VL-2B widths, InternViT-300M +
Qwen2.5-1.5B, optionally with fewer layers so it fits a small machine), writes it as a
transformers-layout folder with a small BPE tokenizer, then times, for each batch size,
transformers' ``generate`` (greedy, KV cache, SDPA) and ours (``load_generator`` on the same
folder) on the same prompt: one image + a question, ``--new-tokens`` tokens forced
(``min_new_tokens``). transformers runs first, before our CPU backend is installed, so it runs
exactly as a transformers user would. Prints one line per (implementation, batch) and checks
that both produced the same greedy tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from megatron_sail import cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class BenchConfig:
    """What to measure."""

    shape: str = "tiny"
    """'tiny' (tools/make_tiny_hf_checkpoint.py defaults) or '2b' (SAIL-VL-2B widths)."""
    lm_layers: int | None = None
    """Override the LM depth (2b: 28)."""
    vit_layers: int | None = None
    """Override the ViT depth (2b: 24)."""
    new_tokens: int = 32
    """Tokens generated per prompt (forced: stop tokens are ignored until then)."""
    batches: tuple[int, ...] = (1, 4)
    """Batch sizes to time."""
    image: tuple[int, int] = (448, 448)
    """Test image (width, height); 448x448 is one tile."""
    threads: int = 2
    """torch intra-op threads."""


def build_checkpoint(cfg: BenchConfig, out: Path) -> None:
    """Random InternVL of the chosen shape + a tiny BPE tokenizer, in transformers' layout."""
    from megatron_sail.demo.tiny_checkpoint import TinyCheckpointConfig, make_tiny_checkpoint, write_tokenizer
    from transformers import InternVLForConditionalGeneration

    from megatron_sail.config.model import sail_2b
    from megatron_sail.convert import hf_internvl, hf_io

    if cfg.shape == "tiny":
        layers = {} if cfg.lm_layers is None else {"text_layers": cfg.lm_layers}
        make_tiny_checkpoint(out, TinyCheckpointConfig(vocab_size=300, tokenizer=True, **layers))
        return
    tok_dir = Path(tempfile.mkdtemp(dir=out.parent))
    image_token = write_tokenizer(tok_dir, 300)
    m = sail_2b()
    m = dataclasses.replace(
        m, img_context_token_id=image_token,
        vision=dataclasses.replace(m.vision, num_layers=cfg.vit_layers or m.vision.num_layers),
        language=dataclasses.replace(m.language, num_layers=cfg.lm_layers or m.language.num_layers))
    hf_cfg = hf_internvl.to_hf_config(m)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(hf_cfg).float()
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and m.language.tie_embeddings)}
    config = hf_cfg.to_dict()
    config["architectures"] = ["InternVLForConditionalGeneration"]
    hf_io.write_checkpoint(out, config, hf_io.to_disk_keys(state), tokenizer_from=tok_dir)


def make_image(cfg: BenchConfig, folder: Path) -> str:
    """A random RGB PNG of the configured size."""
    import numpy as np
    from PIL import Image

    w, h = cfg.image
    path = folder / "bench.png"
    Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype("uint8")).save(path)
    return str(path)


def time_transformers(ckpt: Path, prompt, batch: int, cfg: BenchConfig) -> tuple[float, float, list]:
    """(prefill seconds, total seconds, tokens of row 0) of transformers' greedy generate."""
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ids = torch.tensor(prompt.ids)[None].repeat(batch, 1)
    pix = prompt.tiles.repeat(batch, 1, 1, 1) if prompt.tiles.size(0) else None
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        model.generate(**kw, max_new_tokens=2, min_new_tokens=2)  # warm-up
        t0 = time.perf_counter()
        model.generate(**kw, max_new_tokens=1, min_new_tokens=1)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        seq = model.generate(**kw, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens)
        total = time.perf_counter() - t0
    del model
    gc.collect()
    return prefill, total, seq[0, ids.size(1):].tolist()


def time_ours(gen, prompt, batch: int) -> tuple[float, float, list]:
    """(prefill seconds, total seconds, tokens of row 0) of our Generator."""
    from megatron_sail.inference.prompts import Prompt

    prompts = [Prompt(list(prompt.ids), prompt.tiles, prompt.max_new_tokens) for _ in range(batch)]
    gen.cfg.batch_size = batch
    gen.generate_prompts([Prompt(list(prompt.ids), prompt.tiles, 2)])  # warm-up
    before = dict(gen.stats)
    t0 = time.perf_counter()
    res = gen.generate_prompts(prompts)
    total = time.perf_counter() - t0
    return gen.stats["prefill_s"] - before["prefill_s"], total, res[0].token_ids


def line(name: str, batch: int, new: int, prefill: float, total: float) -> str:
    """One result line: end-to-end and decode-only tokens/s."""
    decode = max(total - prefill, 1e-9)
    return (f"impl={name} batch={batch} new_tokens={new} prefill_s={prefill:.3f} total_s={total:.3f} "
            f"tokens_per_s={batch * new / total:.1f} decode_tokens_per_s={batch * (new - 1) / decode:.1f}")


def run(cfg: BenchConfig) -> list[str]:
    """Build, time both implementations, return the result lines."""
    torch.set_num_threads(cfg.threads)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        t0 = time.perf_counter()
        build_checkpoint(cfg, ckpt)
        print(f"built {cfg.shape} checkpoint in {time.perf_counter() - t0:.1f}s", flush=True)
        image = make_image(cfg, Path(tmp))
        from megatron_sail.data.tokenizer import load_tokenizer
        from megatron_sail.inference import GenerationConfig, GenerationRequest
        from megatron_sail.inference.loading import inspect_checkpoint
        from megatron_sail.inference.prompts import PromptBuilder

        ck = inspect_checkpoint(ckpt)
        builder = PromptBuilder(load_tokenizer(str(ckpt)), ck.settings, 12)
        prompt = builder.build(GenerationRequest("Describe this image in detail.", [image]), cfg.new_tokens)
        print(f"prompt: {len(prompt.ids)} tokens, {prompt.tiles.size(0)} tiles", flush=True)
        hf = {b: time_transformers(ckpt, prompt, b, cfg) for b in cfg.batches}
        from megatron_sail.inference import load_generator

        gen = load_generator(str(ckpt), GenerationConfig(max_new_tokens=cfg.new_tokens,
                                                          min_new_tokens=cfg.new_tokens))
        torch.set_num_threads(cfg.threads)
        for b in cfg.batches:
            ours = time_ours(gen, prompt, b)
            lines.append(line("transformers", b, cfg.new_tokens, hf[b][0], hf[b][1]))
            lines.append(line("megatron_sail", b, cfg.new_tokens, ours[0], ours[1]))
            same = ours[2] == hf[b][2]
            lines.append(f"batch={b} same_greedy_tokens={same}")
            for x in lines[-3:]:
                print(x, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=("tiny", "2b"), default="tiny")
    p.add_argument("--lm-layers", type=int, default=None)
    p.add_argument("--vit-layers", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--image", type=int, nargs=2, default=[448, 448], metavar=("W", "H"))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    run(BenchConfig(a.shape, a.lm_layers, a.vit_layers, a.new_tokens, tuple(a.batches),
                    tuple(a.image), a.threads))
    return 0


if __name__ == "__main__":
    cli.run(main)
