"""Demo SFT data at graded complexity (issue 24; docs/sft_curriculum.md), drawn like the demo
set (demo/generator.py): small images of coloured shapes whose answers are fully determined by them.

- Level 1, one attribute of one object: one shape; "What colour is the shape?", "What shape is
  shown?".
- Level 2, two objects and a relation: two shapes side by side; "What colour is the shape left
  of the square?", "What shape is right of the red circle?", "Is the red circle left of the
  blue square?".
- Level 3, counting and multi-step questions that build on levels 1-2: three shapes, colours
  and shapes may repeat; "How many red shapes are there?", "How many circles are there?",
  "How many shapes are left of the blue square?" (find the object by its attributes, apply
  the relation, count).

Every question carries VLMEvalKit's short-answer suffix, as the ``vqa`` benchmark prompts it,
and has a one-word answer. ``write_pool`` writes the SFT pool (LLaVA JSONL with a ``level``
field, images under ``images/``); ``write_level_benchmarks`` writes one held-out TSV per level
(``vqa@level1`` ...) on the benchmark-only background, with chance.json (the best constant
answer, by the vqa rule). Seeded: the same arguments give the same files."""

from __future__ import annotations

import base64
import io
import json
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from megatron_sail.demo.generator import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_BACKGROUND,
    NUMBERS,
    SHAPES,
    _draw_shape,
)
from megatron_sail.eval.prompts import SHORT_ANSWER

LEVELS = (1, 2, 3)
SIZE = (96, 64)
"""Image size (width, height): three slots side by side."""
SLOTS = (1 / 6, 1 / 2, 5 / 6)
"""Horizontal centres of the object slots, as fractions of the width."""


@dataclass(frozen=True)
class GradedConfig:
    """What the graded generator writes."""

    samples_per_level: int = 1000
    """SFT pool samples of each level."""
    bench_items: int = 100
    """Held-out benchmark items per level."""
    seed: int = 0
    """Seed of every random choice (the benchmarks use seed + 1)."""


def _objects(rng: random.Random, level: int) -> list[dict]:
    """The objects of a scene of this level, left to right."""
    n = level
    slots = sorted(rng.sample(range(3), n))
    if level == 2:  # two distinct shapes and colours: each one can be named by either
        shapes, colours = rng.sample(SHAPES, 2), rng.sample(list(COLOURS), 2)
    else:  # level 3 repeats colours/shapes often, so that counts vary
        palette = rng.sample(list(COLOURS), 2)
        shapes = [rng.choice(SHAPES) for _ in range(n)]
        colours = [rng.choice(palette) for _ in range(n)]
    return [{"shape": s, "colour": c, "slot": k} for s, c, k in zip(shapes, colours, slots)]


def draw(objects: list[dict], rng: random.Random, held_out: bool = False) -> Image.Image:
    """The scene: each object in its slot, a little vertical jitter."""
    w, h = SIZE
    img = Image.new("RGB", (w, h), HELD_OUT_BACKGROUND if held_out else rng.choice(BACKGROUNDS))
    d = ImageDraw.Draw(img)
    r = 11
    for o in objects:
        cx, cy = int(SLOTS[o["slot"]] * w), h // 2 + rng.randint(-8, 8)
        _draw_shape(d, o["shape"], (cx - r, cy - r, cx + r, cy + r), COLOURS[o["colour"]])
    return img


def _name(o: dict) -> str:
    return f"{o['colour']} {o['shape']}"


def question(rng: random.Random, level: int, objs: list[dict]) -> tuple[str, str, str]:
    """(question, answer, kind) about the scene."""
    if level == 1:
        o = objs[0]
        return rng.choice(
            [
                ("What colour is the shape?", o["colour"], "colour"),
                ("What shape is shown?", o["shape"], "shape"),
            ]
        )
    if level == 2:
        a, b = objs  # a is left of b
        kind = rng.choice(["colour_of_left", "shape_of_right", "is_left"])
        if kind == "colour_of_left":
            return f"What colour is the shape left of the {b['shape']}?", a["colour"], kind
        if kind == "shape_of_right":
            return f"What shape is right of the {_name(a)}?", b["shape"], kind
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        return f"Is the {_name(first)} left of the {_name(second)}?", "yes" if first is a else "no", kind
    kind = rng.choice(["count_colour", "count_shape", "count_left"])
    if kind == "count_colour":
        c = rng.choice([o["colour"] for o in objs])
        return f"How many {c} shapes are there?", NUMBERS[sum(o["colour"] == c for o in objs)], kind
    if kind == "count_shape":
        s = rng.choice(SHAPES)
        return f"How many {s}s are there?", NUMBERS[sum(o["shape"] == s for o in objs)], kind
    named = [o for o in objs if sum(_name(p) == _name(o) for p in objs) == 1]
    if not named:  # every object has a twin: count by colour instead
        c = objs[0]["colour"]
        return f"How many {c} shapes are there?", NUMBERS[sum(o["colour"] == c for o in objs)], "count_colour"
    t = rng.choice(named)
    return f"How many shapes are left of the {_name(t)}?", NUMBERS[objs.index(t)], kind


def sample(rng: random.Random, level: int, held_out: bool = False) -> tuple[Image.Image, str, str, str]:
    """(image, question without the answer-format suffix, answer, kind) of one level."""
    objs = _objects(rng, level)
    img = draw(objs, rng, held_out)
    q, a, kind = question(rng, level, objs)
    return img, q, a, kind


def write_pool(out: str, cfg: GradedConfig = GradedConfig()) -> dict:
    """The SFT pool: ``out``/sft_pool.jsonl (levels interleaved at random) and its images;
    returns {path, samples, per_level, texts} (texts: for the tokenizer)."""
    rng = random.Random(cfg.seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    levels = [lv for lv in LEVELS for _ in range(cfg.samples_per_level)]
    rng.shuffle(levels)
    path = os.path.join(out, "sft_pool.jsonl")
    texts = []
    with open(path + ".tmp", "w") as f:
        for i, level in enumerate(levels):
            img, q, a, kind = sample(rng, level)
            rel = f"images/sft_{i:06d}.png"
            img.save(os.path.join(out, rel), format="PNG")
            conv = [{"from": "human", "value": f"<image>\n{q}\n{SHORT_ANSWER}"}, {"from": "gpt", "value": a}]
            f.write(
                json.dumps(
                    {"id": f"sft_{i:06d}", "image": rel, "level": level, "kind": kind, "conversations": conv}
                )
                + "\n"
            )
            texts += [q, a]
    os.replace(path + ".tmp", path)
    return {"path": path, "samples": len(levels), "per_level": cfg.samples_per_level, "texts": texts}


def _b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _chance(path: str) -> float:
    """The best constant answer's score on a level set (vqa rule)."""
    from megatron_sail.eval.registry import get_benchmark
    from megatron_sail.eval.tsv import read_items

    spec, items = get_benchmark("vqa"), read_items(path)
    answers = {it.get("answer") for it in items}
    return max(spec.score(items, {it.index: a for it in items}).score for a in answers)


def write_level_benchmarks(out: str, cfg: GradedConfig = GradedConfig()) -> dict:
    """``out``/level{1,2,3}.tsv (VLMEvalKit VQA TSVs on held-out images) and chance.json;
    returns {'vqa@levelK': {path, chance}}."""
    from megatron_sail.eval.tsv import write_tsv

    rng = random.Random(cfg.seed + 1)
    os.makedirs(out, exist_ok=True)
    info = {}
    for level in LEVELS:
        rows = []
        for i in range(cfg.bench_items):
            img, q, a, kind = sample(rng, level, held_out=True)
            rows.append({"index": str(i), "image": _b64(img), "question": q, "answer": a, "category": kind})
        path = os.path.join(out, f"level{level}.tsv")
        write_tsv(path, ["index", "image", "question", "answer", "category"], rows)
        info[f"vqa@level{level}"] = {"path": path, "chance": _chance(path)}
    with open(os.path.join(out, "chance.json.tmp"), "w") as f:
        json.dump(info, f, indent=1)
    os.replace(os.path.join(out, "chance.json.tmp"), os.path.join(out, "chance.json"))
    return info
