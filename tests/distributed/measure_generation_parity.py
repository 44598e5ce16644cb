#!/usr/bin/env python
"""Longer greedy-parity run than test_generate.py (run by hand; pytest does not collect it).

    OMP_NUM_THREADS=1 PYTHONPATH=.:tools:tests:tests/unit:tests/distributed \
        python tests/distributed/measure_generation_parity.py [--new-tokens 48]

(the PYTHONPATH is pytest's ``pythonpath`` from pyproject.toml: the checkout, the tools and the
test helpers.)

For every checkpoint of generate_cases (Qwen2 in both InternVL layouts and the FAMILIES:
Qwen3, Qwen3-MoE in both layouts, AIMv2 + Qwen3-MoE in the sailvl layout): 12 prompts (text
only, one image, two images) decoded in batches of 6 with ``--new-tokens`` forced
(``min_new_tokens``, so stop tokens never shorten the comparison) by our Generator and by
transformers' greedy ``generate`` one prompt at a time; then the Qwen3-MoE checkpoints again
at TP=2. Prints, per checkpoint, how many prompts and tokens are identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import generate_cases as gc
from launcher import launch

NAMES = ("hf", "chat") + gc.FAMILIES
MOE = ("qwen3_moe", "qwen3_moe_chat")


def _requests(images: list[str]):
    """12 prompts cycling through the test texts, with 0, 1 or 2 images."""
    from megatron_sail.inference import GenerationRequest

    texts = [
        "Describe this image in detail.",
        "What is in the picture?",
        "a red circle on blue",
        "<image>\nWhat is in the picture? <image>\na red circle on blue",
    ]
    out = []
    for i in range(12):
        text = texts[i % 4]
        imgs = [images[1], images[2]] if "<image>" in text else ([images[i % 3]] if i % 3 else [])
        out.append(GenerationRequest(text, imgs))
    return out


def _config(new: int):
    from megatron_sail.inference import GenerationConfig

    return GenerationConfig(max_new_tokens=new, min_new_tokens=new, max_tiles=gc.MAX_TILES, batch_size=6)


def _single(rank, paths, new):
    """Ours and transformers' tokens for every checkpoint at one rank."""
    gc.set_threads()
    from megatron_sail.inference import load_generator

    out = {}
    for name in NAMES:
        gen = load_generator(paths[name], _config(new))
        reqs = _requests(paths["images"])
        prompts = [gen.prompts.build(r, new, i) for i, r in enumerate(reqs)]
        t0 = time.perf_counter()
        ours = [r.token_ids for r in gen.generate(reqs)]
        t_ours = time.perf_counter() - t0
        ref = gc.hf_reference(paths[name], prompts, gen.stop_ids, new)
        out[name] = dict(
            prompts=len(reqs),
            prompt_tokens=sum(len(p.ids) for p in prompts),
            tokens=sum(map(len, ours)),
            identical_prompts=sum(a == b for a, b in zip(ours, ref)),
            identical_tokens=sum(x == y for a, b in zip(ours, ref) for x, y in zip(a, b)),
            ours_s=round(t_ours, 2),
            ours=ours,
        )
    return out


def _tp2(rank, paths, new):
    """The MoE checkpoints at TP=2 (experts split over TP)."""
    gc.set_threads()
    from megatron_sail.inference import load_generator
    from megatron_sail.inference.loading import LoadConfig

    return {
        name: [
            r.token_ids
            for r in load_generator(paths[name], _config(new), LoadConfig(tp=2)).generate(
                _requests(paths["images"])
            )
        ]
        for name in MOE
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=48)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = gc.make_checkpoints(Path(tmp))
        [single] = launch(_single, 1, paths, a.new_tokens, timeout=1800)
        tp2 = launch(_tp2, 2, paths, a.new_tokens, timeout=1800)
    for name, res in single.items():
        print(name, json.dumps({k: v for k, v in res.items() if k != "ours"}))
    for name in MOE:
        same = all(r[name] == single[name]["ours"] for r in tp2)
        print(f"{name} tp=2 identical to tp=1: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
