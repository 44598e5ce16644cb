"""Procedural demo data: small images whose captions and answers are fully determined by them.

Each image shows 1-3 copies of one shape (circle, square, triangle) in one colour, grouped in
the left or right half, or a short rendered word. Captions and questions ask exactly about those
attributes ("What colour is the shape?" -> "red"), also in the three forms the demo benchmarks
use (tools/make_demo_benchmark.py): POPE-style yes/no ("Is there one shape in the image?"),
multiple choice with VLMEvalKit's option lines and letter instruction, and short answers with its
"single word or phrase" suffix, so a tiny VLM can learn them in a few hundred CPU steps.
Everything is seeded: the same arguments give the same files.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from megatron_sail.config.data import DEFAULT_CAPTION_PROMPTS
from megatron_sail.data.tokenizer import SPECIAL_TOKENS
from megatron_sail.eval.prompts import MCQ_SUFFIX, SHORT_ANSWER

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 170),
    "orange": (245, 130, 0),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three")
WORDS = ("cat", "dog", "sun", "box", "sky", "tree", "fish", "car")
SIZES = ((64, 64), (64, 64), (96, 64), (64, 96))
"""Image sizes (width, height); mixed aspect ratios exercise the tiling rule."""
BACKGROUNDS = ((255, 255, 255), (235, 235, 235))
"""Background shades of the training and validation images."""
HELD_OUT_BACKGROUND = (245, 245, 245)
"""Background of benchmark images only, so that no benchmark image equals a training image."""


@dataclass(frozen=True)
class DemoConfig:
    """What make_demo_data.py generates."""

    samples: int = 2000
    """Training conversations (one image each, apart from a few text-only ones)."""
    val_samples: int = 200
    """Held-out conversations, on their own images."""
    seed: int = 0
    """Seed of every random choice."""
    word_fraction: float = 0.1
    """Share of images that show a word instead of shapes."""
    text_only_fraction: float = 0.02
    """Share of samples without an image."""
    vocab_size: int = 512
    """BPE vocabulary size of the demo tokenizer (special tokens included)."""


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """Draw one circle, square or (upward) triangle filling ``box``."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_scene(
    rng: random.Random, word_fraction: float = 0.1, held_out: bool = False
) -> tuple[Image.Image, dict]:
    """One image and the facts it shows (``held_out``: on the benchmark-only background)."""
    w, h = rng.choice(SIZES)
    background = rng.choice(BACKGROUNDS)
    img = Image.new("RGB", (w, h), HELD_OUT_BACKGROUND if held_out else background)
    draw = ImageDraw.Draw(img)
    if rng.random() < word_fraction:
        word = rng.choice(WORDS)
        font = ImageFont.load_default(size=min(w, h) // 3)
        draw.text((w // 2, h // 2), word, fill=(0, 0, 0), font=font, anchor="mm")
        return img, {"kind": "word", "word": word}
    shape, colour, count = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randint(1, 3)
    side = rng.choice(["left", "right"])
    cell = h // 3
    r = max(4, min(w // 2, cell) // 2 - 2)
    cx = w // 4 if side == "left" else 3 * w // 4
    for k in range(count):
        cy = cell * k + cell // 2 if count == 3 else (h * (k + 1)) // (count + 1)
        _draw_shape(draw, shape, (cx - r, cy - r, cx + r, cy + r), COLOURS[colour])
    return img, {"kind": "shapes", "shape": shape, "colour": colour, "count": count, "side": side}


def caption_of(facts: dict) -> str:
    """The one correct caption of a scene."""
    if facts["kind"] == "word":
        return f"the word {facts['word']}."
    n, shape = facts["count"], facts["shape"] + ("s" if facts["count"] > 1 else "")
    return f"{NUMBERS[n]} {facts['colour']} {shape} on the {facts['side']}."


def questions_of(facts: dict) -> list[tuple[str, str]]:
    """(question, short answer) pairs about a scene."""
    if facts["kind"] == "word":
        return [("What word is written?", facts["word"])]
    many = facts["count"] > 1
    return [
        ("What colour are the shapes?" if many else "What colour is the shape?", facts["colour"]),
        ("What shape is shown?", facts["shape"]),
        ("How many shapes are there?", NUMBERS[facts["count"]]),
        ("Where are the shapes?" if many else "Where is the shape?", facts["side"]),
    ]


def yes_no_of(rng: random.Random, facts: dict) -> tuple[str, str]:
    """POPE's question form, "Is there <object> in the image?", with one fixed object: a single
    shape ("Is there one shape in the image?", yes for 1 of the 1-3 shapes).

    Asking about any of the three shapes or colours makes the answer a comparison between the
    question's words and the image, and shape itself is the attribute the tiny ViT (8 px patches
    on 32 px tiles) learns worst; both kept POPE at the always-yes/always-no level within the
    quickstart's steps, while counting is learned first. ``rng`` is unused (the signature of the
    other question builders)."""
    return "Is there one shape in the image?", "yes" if facts["count"] == 1 else "no"


def mcq_of(rng: random.Random, facts: dict) -> tuple[str, dict, str]:
    """A multiple-choice question on colour, shape or count: (question, {letter: option},
    answer letter). Options keep a fixed order (colours as listed in COLOURS, all three shapes,
    counts ascending), as many benchmarks list them; colour shows the answer and three others."""
    many = facts["count"] > 1
    attr = rng.choice(["colour", "shape", "count"])
    if attr == "colour":
        q, truth = ("What colour are the shapes?" if many else "What colour is the shape?"), facts["colour"]
        others = rng.sample([c for c in COLOURS if c != truth], 3)
        order = list(COLOURS)
    elif attr == "shape":
        q, truth = "What shape is shown?", facts["shape"]
        others = [s for s in SHAPES if s != truth]
        order = list(SHAPES)
    else:
        q, truth = "How many shapes are there?", NUMBERS[facts["count"]]
        others = [n for n in NUMBERS[1:] if n != truth]
        order = list(NUMBERS)
    options = sorted(others + [truth], key=order.index)
    letters = {chr(ord("A") + i): o for i, o in enumerate(options)}
    return q, letters, chr(ord("A") + options.index(truth))


def mcq_text(question: str, options: dict) -> str:
    """The multiple-choice prompt as the evaluation builds it (eval/prompts.py)."""
    return question + "".join(f"\n{k}. {v}" for k, v in options.items()) + "\n" + MCQ_SUFFIX


def question_turn(rng: random.Random, facts: dict) -> tuple[str, str]:
    """One question about a scene. Shapes: a short question (25%, half of them with the VQA
    suffix), a POPE-style yes/no question (35%) or a multiple-choice one (40%): the benchmark
    forms carry the most weight because their answers are single tokens that the tiny model
    must ground in the image. Words: what is written, with or without the suffix."""
    short = rng.choice(questions_of(facts))
    if facts["kind"] == "shapes":
        r = rng.random()
        if r >= 0.6:
            q, options, letter = mcq_of(rng, facts)
            return mcq_text(q, options), letter
        if r >= 0.25:
            return yes_no_of(rng, facts)
    if rng.random() < 0.5:
        return short[0] + "\n" + SHORT_ANSWER, short[1]
    return short


def make_conversation(rng: random.Random, facts: dict) -> list[dict]:
    """A caption request or one or two questions, LLaVA style, <image> in the first turn."""
    if rng.random() < 0.3:
        turns = [(rng.choice(DEFAULT_CAPTION_PROMPTS), caption_of(facts))]
    else:
        turns = [question_turn(rng, facts) for _ in range(rng.choice([1, 2, 2]))]
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" + q) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


TEXT_ONLY = [
    ("Count to three.", "one two three"),
    ("What colour is grass?", "green"),
    ("What colour is the sky?", "blue"),
    ("Name a shape.", "circle"),
]


def write_split(out: str, name: str, n: int, rng: random.Random, cfg: DemoConfig) -> list[str]:
    """Images + <name>.jsonl (LLaVA) + <name>_captions.jsonl (caption pairs); returns the texts."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    texts = []
    with (
        open(os.path.join(out, f"{name}.jsonl.tmp"), "w") as conv_f,
        open(os.path.join(out, f"{name}_captions.jsonl.tmp"), "w") as cap_f,
    ):
        for i in range(n):
            sid = f"{name}_{i:06d}"
            if rng.random() < cfg.text_only_fraction:
                q, a = rng.choice(TEXT_ONLY)
                conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
                conv_f.write(json.dumps({"id": sid, "conversations": conv}) + "\n")
                texts += [q, a]
                continue
            img, facts = make_scene(rng, cfg.word_fraction)
            rel = f"images/{sid}.png"
            img.save(os.path.join(out, rel), format="PNG")
            conv = make_conversation(rng, facts)
            conv_f.write(json.dumps({"id": sid, "image": rel, "conversations": conv}) + "\n")
            cap_f.write(json.dumps({"image": rel, "caption": caption_of(facts)}) + "\n")
            texts += [t["value"].replace("<image>\n", "") for t in conv] + [caption_of(facts)]
    for f in (f"{name}.jsonl", f"{name}_captions.jsonl"):
        os.replace(os.path.join(out, f + ".tmp"), os.path.join(out, f))
    return texts


def train_tokenizer(texts: list[str], path: str, vocab_size: int = 512) -> None:
    """Byte-level BPE trained on the texts, with the template's special tokens; saved atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    base = ["system\n", "user\n", "assistant\n", "\n"] + list(DEFAULT_CAPTION_PROMPTS)
    tok.train_from_iterator(base + texts, trainer=trainer)
    tok.save(path + ".tmp")
    os.replace(path + ".tmp", path)


def make_demo(out: str, cfg: DemoConfig = DemoConfig()) -> dict:
    """Write the demo set to ``out``; returns paths and counts."""
    rng = random.Random(cfg.seed)
    os.makedirs(out, exist_ok=True)
    texts = write_split(out, "train", cfg.samples, rng, cfg)
    texts += write_split(out, "val", cfg.val_samples, rng, cfg)
    train_tokenizer(texts, os.path.join(out, "tokenizer.json"), cfg.vocab_size)
    return {
        "out": out,
        "train": os.path.join(out, "train.jsonl"),
        "val": os.path.join(out, "val.jsonl"),
        "train_captions": os.path.join(out, "train_captions.jsonl"),
        "tokenizer": os.path.join(out, "tokenizer.json"),
        "samples": cfg.samples,
        "val_samples": cfg.val_samples,
    }
