"""An unlabeled demo pool for the SAIL-Caption example: demo images whose text is what web
alt-text often is: empty, boilerplate, or about another image.

``pool.jsonl`` (caption format: ``image``, ``caption`` = the noisy text) is what the recipe
recaptions and what the baseline trains on; ``pool_truth.jsonl`` keeps the exact captions, only
for measuring (the recipe never reads it). Seeded like the demo set.

A few extra entries are resized copies of pool images (2x as JPEG, 1.5x as PNG) with text of
their own, as the web repeats a picture at other sizes: real near duplicates for the dedup pass
(``pool_truth.jsonl`` names the original in ``copy_of``). They come after the originals from
their own seed, so the originals do not change with their number.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass

from PIL import Image

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
    near_copy_fraction: float = 0.05
    """Extra entries, as a share of ``samples``, that are resized copies of pool images."""


def noisy_text(rng: random.Random, truth: str, other: str, cfg: PoolConfig) -> str:
    """Empty, junk, or another scene's caption (the rest of the pool: wrong but fluent)."""
    r = rng.random()
    if r < cfg.empty_fraction:
        return ""
    if r < cfg.empty_fraction + cfg.junk_fraction:
        return rng.choice(JUNK).format(n=rng.randrange(10000))
    return other if other != truth else ""


def resized_copy(img: Image.Image, k: int) -> tuple[bytes, str]:
    """A near duplicate of ``img``: 2x bicubic as JPEG quality 90 (even k) or 1.5x as PNG."""
    w, h = img.size
    scale, fmt = ((2, 1), "JPEG") if k % 2 == 0 else ((3, 2), "PNG")
    big = img.resize((w * scale[0] // scale[1], h * scale[0] // scale[1]), Image.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue(), "jpg" if fmt == "JPEG" else "png"


def make_pool(out: str, cfg: PoolConfig = PoolConfig()) -> dict:
    """Write ``out/pool/*``, ``out/pool.jsonl`` and ``out/pool_truth.jsonl``; returns counts."""
    rng = random.Random(cfg.seed)
    os.makedirs(os.path.join(out, "pool"), exist_ok=True)
    scenes = [demo.make_scene(rng, cfg.word_fraction) for _ in range(cfg.samples)]
    kinds = {"empty": 0, "junk": 0, "wrong": 0}
    paths = [os.path.join(out, f) for f in ("pool.jsonl", "pool_truth.jsonl")]
    with open(paths[0] + ".tmp", "w") as pool_f, open(paths[1] + ".tmp", "w") as truth_f:

        def entry(i: int, rel: str, truth: str, r: random.Random, **extra) -> None:
            """One entry: its noisy text drawn from ``r`` (the originals' and the copies' own streams)."""
            other = demo.caption_of(scenes[r.randrange(len(scenes))][1])
            text = noisy_text(r, truth, other, cfg)
            kinds["empty" if not text else "wrong" if text == other else "junk"] += 1
            pool_f.write(json.dumps({"id": f"pool_{i:06d}", "image": rel, "caption": text}) + "\n")
            truth_f.write(json.dumps({"id": f"pool_{i:06d}", "image": rel, "caption": truth, **extra}) + "\n")

        for i, (img, facts) in enumerate(scenes):
            rel = f"pool/pool_{i:06d}.png"
            img.save(os.path.join(out, rel), format="PNG")
            entry(i, rel, demo.caption_of(facts), rng)
        copies = round(cfg.samples * cfg.near_copy_fraction) if scenes else 0
        crng = random.Random(cfg.seed + 1)
        for k in range(copies):
            src = crng.randrange(len(scenes))
            data, ext = resized_copy(scenes[src][0], k)
            i = len(scenes) + k
            rel = f"pool/pool_{i:06d}.{ext}"
            with open(os.path.join(out, rel), "wb") as f:
                f.write(data)
            entry(i, rel, demo.caption_of(scenes[src][1]), crng, copy_of=f"pool_{src:06d}")
    for p in paths:
        os.replace(p + ".tmp", p)
    return {
        "pool": paths[0],
        "pool_truth": paths[1],
        "pool_samples": cfg.samples + copies,
        "pool_near_copies": copies,
        "pool_text": kinds,
    }
