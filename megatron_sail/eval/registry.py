"""The benchmark registry (lmms-eval's task registry idea): one BenchmarkSpec per name says how
to prompt an item, how to clean the answer and which rule scores it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from megatron_sail.eval import prompts
from megatron_sail.eval.result import BenchmarkScore
from megatron_sail.eval.score_caption import score_caption
from megatron_sail.eval.score_mcq import score_mcq
from megatron_sail.eval.score_vqa import score_ocrbench, score_vqa
from megatron_sail.eval.score_yorn import score_hallusionbench, score_mme, score_pope


@dataclass(frozen=True)
class BenchmarkSpec:
    """How one benchmark is prompted and scored."""

    name: str
    """Registry name (the NAME of --benchmark NAME=PATH)."""
    kind: str
    """yorn, mcq, vqa or caption: which prompt family (caption: the question as written)."""
    scorer: Callable
    """(items, predictions) -> BenchmarkScore."""
    prompt_style: str = ""
    """Variant within the family (mme, hallusionbench for yes/no)."""
    max_tiles: int = 10
    """Tiles per image VLMEvalKit's SAIL-VL wrapper uses for this set (its default is 10)."""
    strip_period: bool = False
    """Drop one trailing '.' from the answer (the wrapper does so for ChartQA and OCR-VQA)."""
    max_new_tokens: int = 64
    """Answer budget: these sets want a word, a letter or a short phrase."""

    def prompt(self, item) -> str:
        """The user text for an item, image placeholders included."""
        if self.kind == "yorn":
            text = prompts.yes_no_prompt(item, self.prompt_style)
        elif self.kind == "mcq":
            text = prompts.mcq_prompt(item)
        elif self.kind == "caption":
            text = item.get("question", "")
        else:
            text = prompts.vqa_prompt(item)
        return prompts.with_images(text, len(item.images))

    def clean(self, answer: str) -> str:
        """The prediction as it is stored and scored."""
        answer = answer.strip()
        if self.strip_period and answer.endswith("."):
            answer = answer[:-1]
        return answer

    def score(self, items, predictions: dict) -> BenchmarkScore:
        """Score predictions (index -> text) of these items."""
        if not items:
            raise ValueError(f"{self.name}: no items to score")
        return self.scorer(items, predictions)


def _vqa(rule: str) -> Callable:
    """A VQA scorer bound to one per-item rule."""
    return lambda items, preds: score_vqa(items, preds, rule)


BENCHMARKS: dict[str, BenchmarkSpec] = {s.name: s for s in [
    BenchmarkSpec("pope", "yorn", score_pope, max_new_tokens=16),
    BenchmarkSpec("mme", "yorn", score_mme, "mme", max_new_tokens=16),
    BenchmarkSpec("hallusionbench", "yorn", score_hallusionbench, "hallusionbench",
                  max_new_tokens=16),
    BenchmarkSpec("mmbench", "mcq", score_mcq, max_new_tokens=16),
    BenchmarkSpec("seed", "mcq", score_mcq, max_new_tokens=16),
    BenchmarkSpec("ai2d", "mcq", score_mcq, max_new_tokens=16),
    BenchmarkSpec("realworldqa", "mcq", score_mcq, max_new_tokens=16),
    BenchmarkSpec("mmmu", "mcq", lambda i, p: score_mcq(i, p, open_as_mmmu=True), max_tiles=12),
    BenchmarkSpec("mcq", "mcq", score_mcq, max_new_tokens=16),
    BenchmarkSpec("ocrbench", "vqa", score_ocrbench, max_tiles=24, max_new_tokens=128),
    BenchmarkSpec("docvqa", "vqa", _vqa("anls"), max_tiles=18),
    BenchmarkSpec("infovqa", "vqa", _vqa("anls"), max_tiles=24),
    BenchmarkSpec("chartqa", "vqa", _vqa("relaxed"), max_tiles=12, strip_period=True),
    BenchmarkSpec("textvqa", "vqa", _vqa("vqa_accuracy")),
    BenchmarkSpec("ocrvqa", "vqa", _vqa("exact"), max_tiles=12, strip_period=True),
    BenchmarkSpec("vqa", "vqa", _vqa("normalized")),
    BenchmarkSpec("caption", "caption", score_caption, max_new_tokens=48),
]}
"""Every benchmark tools/evaluate.py and --eval-benchmark know."""


def get_benchmark(name: str) -> BenchmarkSpec:
    """The spec of a benchmark name, or an error listing the known ones. ``NAME@LABEL`` is NAME's
    rule under its own name (several sets of one kind side by side, e.g. ``vqa@level1`` and
    ``vqa@level2``: their scores, predictions and metrics keys stay apart)."""
    base, at, label = name.partition("@")
    if base not in BENCHMARKS or (at and not label.replace("_", "").replace("-", "").isalnum()):
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} "
                         "(or NAME@LABEL, LABEL letters, digits, - and _)")
    return dataclasses.replace(BENCHMARKS[base], name=name) if at else BENCHMARKS[base]


def parse_benchmark_arg(text: str) -> tuple[str, str]:
    """NAME=PATH of --benchmark / --eval-benchmark, the name checked."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--benchmark {text!r}: expected NAME=PATH")
    get_benchmark(name)
    return name, path
