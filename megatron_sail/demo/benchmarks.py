"""Small benchmark files in VLMEvalKit's TSV format drawn from the demo generator
(demo/generator.py): POPE-style yes/no, multiple choice on colour/shape/count, and word reading
scored with OCRBench's rule. Their images use a background shade the demo training and
validation sets never use, so none of them is a training image; the facts follow the same
distribution, so a model that learned the demo task beats chance on them.

Each set comes with its guessing baseline (``chance.json``), scored by the set's own rule: the
better of uniform random guessing (yes/no; one of the item's options; one of the demo words,
averaged over many draws) and the best constant answer (always "yes", always "B", always "cat"),
so that a model which ignores the image cannot pass (always "yes" scores F1 66.7 on POPE)."""

from __future__ import annotations

import base64
import io
import json
import os
import random
from dataclasses import dataclass

from megatron_sail.demo import generator as demo
from megatron_sail.eval.registry import get_benchmark
from megatron_sail.eval.tsv import read_items, write_tsv

SETS = {"pope": "demo_pope.tsv", "mcq": "demo_mcq.tsv", "ocrbench": "demo_ocr.tsv"}
"""Benchmark name -> file name of each demo set."""


@dataclass(frozen=True)
class DemoBenchConfig:
    """What make_demo_benchmark.py writes."""

    items: int = 100
    """Questions per set."""
    seed: int = 777
    """Seed of the scenes (the demo training set's default seed is 0, the quickstart's 1234)."""
    chance_draws: int = 200
    """Random-guess draws averaged into the baseline."""


def _b64(img) -> str:
    """PNG bytes of a PIL image, base64 (VLMEvalKit's image column)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _shapes_scene(rng: random.Random):
    """A held-out scene with shapes."""
    return demo.make_scene(rng, word_fraction=0.0, held_out=True)


def pope_rows(rng: random.Random, n: int) -> list[dict]:
    """Yes/no questions in POPE's form, answers alternating Yes/No (balanced like POPE)."""
    rows = []
    while len(rows) < n:
        img, facts = _shapes_scene(rng)
        q, a = demo.yes_no_of(rng, facts)
        want = "yes" if len(rows) % 2 == 0 else "no"
        if a != want:
            continue
        rows.append(
            {
                "index": str(len(rows)),
                "image": _b64(img),
                "question": q,
                "answer": a.capitalize(),
                "category": "demo",
            }
        )
    return rows


def mcq_rows(rng: random.Random, n: int) -> list[dict]:
    """Multiple choice on colour, shape or count (category = the attribute)."""
    rows = []
    for i in range(n):
        img, facts = _shapes_scene(rng)
        q, options, letter = demo.mcq_of(rng, facts)
        category = {"What shape is shown?": "shape", "How many shapes are there?": "count"}.get(q, "colour")
        rows.append(
            {
                "index": str(i),
                "image": _b64(img),
                "question": q,
                **options,
                "answer": letter,
                "category": category,
            }
        )
    return rows


def ocr_rows(rng: random.Random, n: int) -> list[dict]:
    """Word reading, answers as OCRBench stores them (a list literal)."""
    rows = []
    for i in range(n):
        img, facts = demo.make_scene(rng, word_fraction=1.0, held_out=True)
        rows.append(
            {
                "index": str(i),
                "image": _b64(img),
                "question": "What word is written?",
                "answer": str([facts["word"]]),
                "category": "Regular Text Recognition",
            }
        )
    return rows


def caption_rows(rng: random.Random, n: int) -> list[dict]:
    """Held-out scenes to caption, the exact demo caption as the answer (scored by word F1;
    the prompt is the first of the training caption prompts)."""
    rows = []
    for i in range(n):
        img, facts = demo.make_scene(rng, word_fraction=0.1, held_out=True)
        rows.append(
            {
                "index": str(i),
                "image": _b64(img),
                "question": demo.DEFAULT_CAPTION_PROMPTS[0],
                "answer": demo.caption_of(facts),
                "category": facts["kind"],
            }
        )
    return rows


def write_caption_benchmark(path: str, items: int, seed: int) -> str:
    """demo_caption.tsv: held-out images with their exact captions (the ``caption`` benchmark)."""
    write_tsv(
        path, ["index", "image", "question", "answer", "category"], caption_rows(random.Random(seed), items)
    )
    return path


def _answers(name: str, item) -> list[str]:
    """What a guesser can answer to an item."""
    if name == "pope":
        return ["Yes", "No"]
    if name == "mcq":
        return [c for c in "ABCD" if item.get(c)]
    return list(demo.WORDS)


def chance_score(name: str, path: str, draws: int, seed: int = 0) -> float:
    """The better of uniform random guessing (mean over ``draws``) and the best constant
    answer, by the set's own rule."""
    spec, items = get_benchmark(name), read_items(path)
    rng = random.Random(seed)
    total = 0.0
    for _ in range(draws):
        total += spec.score(items, {it.index: rng.choice(_answers(name, it)) for it in items}).score
    constants = {a for it in items for a in _answers(name, it)}
    best = max(spec.score(items, {it.index: a for it in items}).score for a in constants)
    return max(total / draws, best)


def write_demo_benchmarks(out: str, cfg: DemoBenchConfig = DemoBenchConfig()) -> dict:
    """Write the three sets and chance.json under ``out``; returns {name: {path, chance}}."""
    os.makedirs(out, exist_ok=True)
    rng = random.Random(cfg.seed)
    builders = {
        "pope": (pope_rows, ["index", "image", "question", "answer", "category"]),
        "mcq": (mcq_rows, ["index", "image", "question", "A", "B", "C", "D", "answer", "category"]),
        "ocrbench": (ocr_rows, ["index", "image", "question", "answer", "category"]),
    }
    info = {}
    for name, (build, header) in builders.items():
        path = os.path.join(out, SETS[name])
        write_tsv(path, header, build(rng, cfg.items))
        info[name] = {"path": path, "chance": chance_score(name, path, cfg.chance_draws)}
    tmp = os.path.join(out, "chance.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(out, "chance.json"))
    return info
