"""The benchmark registry (lmms-eval's task registry idea): one BenchmarkSpec per name says how
to prompt an item, how SAIL-VL's answer is post-processed at generation and which rule scores it.
VLMEvalKit's dataset names (MMBench_DEV_EN, SEEDBench_IMG, MMMU_DEV_VAL, ...) are aliases of
ours; names are case-insensitive."""

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
    drop_period: bool = False
    """Generation only: drop one trailing '.' from a generated answer, as VLMEvalKit's SailVL
    wrapper does for ChartQA and OCR-VQA (process_response)."""
    max_new_tokens: int = 64
    """Answer budget: these sets want a word, a letter or a short phrase."""
    aliases: tuple = ()
    """VLMEvalKit's dataset names scored by this rule (matched case-insensitively)."""

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

    def postprocess(self, answer: str) -> str:
        """A generated answer as SAIL-VL's VLMEvalKit wrapper returns it (the chat's stripped
        text; one trailing '.' dropped for ChartQA and OCR-VQA). Applied to the answers we
        generate, never to a predictions file being scored: the scorers read stored text as
        VLMEvalKit's scorers do."""
        answer = answer.strip()
        if self.drop_period and answer.endswith("."):
            answer = answer[:-1]
        return answer

    def score(self, items, predictions: dict) -> BenchmarkScore:
        """Score predictions (index -> stored text) of these items."""
        if not items:
            raise ValueError(f"{self.name}: no items to score")
        return self.scorer(items, predictions)


def _vqa(rule: str) -> Callable:
    """A VQA scorer bound to one per-item rule."""
    return lambda items, preds: score_vqa(items, preds, rule)


_MMBENCH = tuple(f"mmbench{s}" for s in ("", "_cn", "_v11", "_cn_v11")) + tuple(
    f"mmbench_{split}_{lang}{v}" for split in ("dev", "test") for lang in ("en", "cn") for v in ("", "_v11")
)

BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in [
        BenchmarkSpec("pope", "yorn", score_pope, max_new_tokens=16),
        BenchmarkSpec("mme", "yorn", score_mme, "mme", max_new_tokens=16),
        BenchmarkSpec("hallusionbench", "yorn", score_hallusionbench, "hallusionbench", max_new_tokens=16),
        BenchmarkSpec(
            "mmbench", "mcq", lambda i, p: score_mcq(i, p, circular=True), max_new_tokens=16, aliases=_MMBENCH
        ),
        BenchmarkSpec("seed", "mcq", score_mcq, max_new_tokens=16, aliases=("seedbench_img",)),
        BenchmarkSpec(
            "ai2d", "mcq", score_mcq, max_new_tokens=16, aliases=("ai2d_test", "ai2d_test_no_mask")
        ),
        BenchmarkSpec("realworldqa", "mcq", score_mcq, max_new_tokens=16),
        BenchmarkSpec(
            "mmmu",
            "mcq",
            lambda i, p: score_mcq(i, p, mmmu=True),
            max_tiles=12,
            aliases=("mmmu_dev_val", "mmmu_test"),
        ),
        BenchmarkSpec("mcq", "mcq", score_mcq, max_new_tokens=16),
        BenchmarkSpec("ocrbench", "vqa", score_ocrbench, max_tiles=24, max_new_tokens=128),
        BenchmarkSpec("docvqa", "vqa", _vqa("anls"), max_tiles=18, aliases=("docvqa_val", "docvqa_test")),
        BenchmarkSpec("infovqa", "vqa", _vqa("anls"), max_tiles=24, aliases=("infovqa_val", "infovqa_test")),
        BenchmarkSpec(
            "chartqa", "vqa", _vqa("relaxed"), max_tiles=12, drop_period=True, aliases=("chartqa_test",)
        ),
        BenchmarkSpec("textvqa", "vqa", _vqa("vqa_accuracy"), aliases=("textvqa_val",)),
        BenchmarkSpec(
            "ocrvqa",
            "vqa",
            _vqa("exact"),
            max_tiles=12,
            drop_period=True,
            aliases=("ocrvqa_test", "ocrvqa_testcore"),
        ),
        BenchmarkSpec("vqa", "vqa", _vqa("normalized")),
        BenchmarkSpec("caption", "caption", score_caption, max_new_tokens=48),
    ]
}
"""Every benchmark tools/evaluate.py and --eval-benchmark know."""

_BY_NAME = {n: s for s in BENCHMARKS.values() for n in (s.name, *s.aliases)}


def get_benchmark(name: str) -> BenchmarkSpec:
    """The spec of a benchmark name (ours or VLMEvalKit's, any case), or an error listing the
    known ones. ``NAME@LABEL`` is NAME's rule under its own name (several sets of one kind side by
    side, e.g. ``vqa@level1`` and ``vqa@level2``: their scores, predictions and metrics keys stay
    apart); the spec's name is then our name of the rule, '@', the label."""
    base, at, label = name.partition("@")
    spec = _BY_NAME.get(base.lower())
    if spec is None or (at and not label.replace("_", "").replace("-", "").isalnum()):
        raise ValueError(
            f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}, "
            "VLMEvalKit's dataset names (MMBench_DEV_EN, SEEDBench_IMG, "
            "MMMU_DEV_VAL, OCRVQA_TESTCORE, ChartQA_TEST, DocVQA_VAL, ...), "
            "or NAME@LABEL (LABEL letters, digits, - and _)"
        )
    return dataclasses.replace(spec, name=f"{spec.name}@{label}") if at else spec


def parse_benchmark_arg(text: str) -> tuple[str, str]:
    """NAME=PATH of --benchmark / --eval-benchmark, the name checked (and kept as written)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--benchmark {text!r}: expected NAME=PATH")
    get_benchmark(name)
    return name, path
