"""Post-training demo data drawn from the demo scenes (demo/generator.py): verifiable prompts for
GRPO and (correct, hallucinated) answer pairs for DPO.

* ``grpo.jsonl``: multiple-choice questions on colour, shape or count in the demo benchmark's
  form (VLMEvalKit's option lines and letter instruction), POPE-style yes/no questions and short
  count questions, each with its reference answer (``choices`` for MCQ): every answer is
  checkable by the benchmark matchers (posttrain/rewards.py).
* ``pairs.jsonl`` (InternVL MPO format: image, question, chosen, rejected): the POPE-style
  question "Is there one shape in the image?" and the colour / count questions, the correct
  answer chosen and a hallucinated one (the opposite yes/no, another colour or count) rejected.

Images are training-background scenes (never the benchmark's held-out background), so the held-
out demo benchmarks (eval/demo_bench.py) stay held out.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from megatron_sail.demo import generator as demo


@dataclass(frozen=True)
class PostTrainDemoConfig:
    """What tools/make_posttrain_demo.py writes."""

    prompts: int = 400
    """GRPO prompts."""
    pairs: int = 400
    """DPO pairs."""
    seed: int = 4321
    """Seed of the scenes and questions."""


def _scene(rng: random.Random, out: str, name: str):
    """A shapes scene saved under images/; returns (relative path, facts)."""
    img, facts = demo.make_scene(rng, word_fraction=0.0)
    rel = f"images/{name}.png"
    img.save(os.path.join(out, rel), format="PNG")
    return rel, facts


def grpo_record(rng: random.Random, facts: dict) -> dict:
    """One verifiable question: MCQ (50%), yes/no (30%) or a short count question (20%)."""
    r = rng.random()
    if r < 0.5:
        q, options, letter = demo.mcq_of(rng, facts)
        return {"question": demo.mcq_text(q, options), "answer": letter, "choices": options}
    if r < 0.8:
        q, a = demo.yes_no_of(rng, facts)
        return {"question": q, "answer": a}
    return {
        "question": "How many shapes are there?\n" + demo.SHORT_ANSWER,
        "answer": demo.NUMBERS[facts["count"]],
        "answer_type": "vqa",
    }


def pair_record(rng: random.Random, facts: dict) -> dict:
    """A question with the correct answer chosen and a hallucinated one rejected."""
    r = rng.random()
    if r < 0.6:
        q, a = demo.yes_no_of(rng, facts)
        return {"question": q, "chosen": a, "rejected": "no" if a == "yes" else "yes"}
    many = facts["count"] > 1
    if r < 0.8:
        wrong = rng.choice([c for c in demo.COLOURS if c != facts["colour"]])
        q = "What colour are the shapes?" if many else "What colour is the shape?"
        return {"question": q + "\n" + demo.SHORT_ANSWER, "chosen": facts["colour"], "rejected": wrong}
    wrong = rng.choice([n for n in demo.NUMBERS[1:] if n != demo.NUMBERS[facts["count"]]])
    return {
        "question": "How many shapes are there?\n" + demo.SHORT_ANSWER,
        "chosen": demo.NUMBERS[facts["count"]],
        "rejected": wrong,
    }


def make_posttrain_demo(out: str, cfg: PostTrainDemoConfig = PostTrainDemoConfig()) -> dict:
    """Write grpo.jsonl, pairs.jsonl and their images under ``out``; returns the paths."""
    rng = random.Random(cfg.seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    paths = {}
    for name, n, build in (("grpo", cfg.prompts, grpo_record), ("pairs", cfg.pairs, pair_record)):
        path = os.path.join(out, f"{name}.jsonl")
        with open(path + ".tmp", "w") as f:
            for i in range(n):
                rel, facts = _scene(rng, out, f"{name}_{i:06d}")
                f.write(json.dumps({"image": rel, **build(rng, facts)}) + "\n")
        os.replace(path + ".tmp", path)
        paths[name] = path
    return paths
