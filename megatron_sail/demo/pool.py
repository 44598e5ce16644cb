"""An unlabeled demo pool for the SAIL-Caption example: demo images whose text is what web
alt-text often is: empty, boilerplate, or about another image.

``pool.jsonl`` (caption format: ``image``, ``caption`` = the noisy text) is what the recipe
recaptions and what the baseline trains on; ``pool_truth.jsonl`` keeps the exact captions, only
for measuring (the recipe never reads it). Seeded like the demo set.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from megatron_sail.demo import generator as demo

JUNK = (
    "IMG_{n:04d}.jpg",
    "image",
    "untitled",
    "photo by user{n}",
    "click to enlarge",
    "stock photo {n}",
    "DSC{n:05d}",
    "thumbnail",
    "picture",
    "screenshot {n}",
)
"""Alt-text templates that say nothing about the image."""


@dataclass(frozen=True)
class PoolConfig:
    """What the pool's text looks like."""

    samples: int = 500
    """Pool images."""
    seed: int = 4321
    """Seed of the scenes and of the noise (different from the demo set's)."""
    empty_fraction: float = 0.3
    """Share with no text at all."""
    junk_fraction: float = 0.35
    """Share with alt-text boilerplate (JUNK)."""
    word_fraction: float = 0.1
    """Share of word images, as in the demo set."""


def noisy_text(rng: random.Random, truth: str, other: str, cfg: PoolConfig) -> str:
    """Empty, junk, or another scene's caption (the rest of the pool: wrong but fluent)."""
    r = rng.random()
    if r < cfg.empty_fraction:
        return ""
    if r < cfg.empty_fraction + cfg.junk_fraction:
        return rng.choice(JUNK).format(n=rng.randrange(10000))
    return other if other != truth else ""


def make_pool(out: str, cfg: PoolConfig = PoolConfig()) -> dict:
    """Write ``out/pool/*.png``, ``out/pool.jsonl`` and ``out/pool_truth.jsonl``; returns counts."""
    rng = random.Random(cfg.seed)
    os.makedirs(os.path.join(out, "pool"), exist_ok=True)
    scenes = [demo.make_scene(rng, cfg.word_fraction) for _ in range(cfg.samples)]
    kinds = {"empty": 0, "junk": 0, "wrong": 0}
    paths = [os.path.join(out, f) for f in ("pool.jsonl", "pool_truth.jsonl")]
    with open(paths[0] + ".tmp", "w") as pool_f, open(paths[1] + ".tmp", "w") as truth_f:
        for i, (img, facts) in enumerate(scenes):
            rel = f"pool/pool_{i:06d}.png"
            img.save(os.path.join(out, rel), format="PNG")
            truth = demo.caption_of(facts)
            other = demo.caption_of(scenes[rng.randrange(len(scenes))][1])
            text = noisy_text(rng, truth, other, cfg)
            kinds["empty" if not text else "wrong" if text == other else "junk"] += 1
            pool_f.write(json.dumps({"id": f"pool_{i:06d}", "image": rel, "caption": text}) + "\n")
            truth_f.write(json.dumps({"id": f"pool_{i:06d}", "image": rel, "caption": truth}) + "\n")
    for p in paths:
        os.replace(p + ".tmp", p)
    return {"pool": paths[0], "pool_truth": paths[1], "pool_samples": cfg.samples, "pool_text": kinds}
