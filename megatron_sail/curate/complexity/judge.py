"""A model rates each sample's complexity 1-5 (``--method judge``), through the recaption
backends (megatron, hf, vllm, openai: megatron_sail/curate/backends/).

The judge sees the sample's first image and this prompt (``JUDGE_PROMPT``), with the
conversation's questions and answers filled in:

    Rate how complex this image-question-answer example is for a vision-language model to
    learn, on a scale of 1 to 5:
    1 = one fact that is directly visible (a colour, a yes/no about one object);
    2 = one fact that needs a closer look (a short reading, one attribute among several objects);
    3 = relations between objects, or reading and combining several pieces of text;
    4 = counting or several steps that build on each other;
    5 = long reasoning, knowledge beyond the image, or many steps.
    Example:
    {conversation}
    Answer with one digit from 1 to 5.

The first digit 1-5 in the answer is the score. A sample without an image, or an answer
without a digit 1-5, is a reject (``no_image``, ``unparsable_rating``) naming what came back.
``--judge-prompt-file`` replaces the prompt (it must contain ``{conversation}``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from megatron_sail.curate.complexity.samples import Sample, qa_pairs

JUDGE_PROMPT = (
    "Rate how complex this image-question-answer example is for a vision-language model to learn, "
    "on a scale of 1 to 5:\n"
    "1 = one fact that is directly visible (a colour, a yes/no about one object);\n"
    "2 = one fact that needs a closer look (a short reading, one attribute among several objects);\n"
    "3 = relations between objects, or reading and combining several pieces of text;\n"
    "4 = counting or several steps that build on each other;\n"
    "5 = long reasoning, knowledge beyond the image, or many steps.\n"
    "Example:\n{conversation}\n"
    "Answer with one digit from 1 to 5."
)
"""The documented judge prompt."""
_DIGIT = re.compile(r"[1-5]")


class RatingError(ValueError):
    """A sample the judge could not rate; ``reason`` names the reject kind."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class JudgeConfig:
    """Which backend judges and how."""

    backend: str = "megatron"
    """megatron, hf, vllm or openai."""
    model: str = ""
    """Checkpoint folder or served model name."""
    prompt: str = JUDGE_PROMPT
    """Prompt with a ``{conversation}`` field."""
    max_new_tokens: int = 8
    """Answer budget (one digit is enough)."""
    batch_size: int = 8
    """Samples rated together."""
    api_base: Optional[str] = None
    """OpenAI-compatible server root (openai)."""
    max_conversation_chars: int = 4000
    """The conversation shown to the judge is cut to this many characters."""


def conversation_text(sample: Sample, limit: int) -> str:
    """The sample's questions and answers as ``Q: ...`` / ``A: ...`` lines, cut to ``limit``."""
    text = "\n".join(f"Q: {q}\nA: {a}" for q, a in qa_pairs(sample.turns))
    return text if len(text) <= limit else text[:limit] + " ..."


def parse_rating(answer: str) -> int:
    """The first digit 1-5 of the judge's answer."""
    m = _DIGIT.search(answer)
    if m is None:
        raise RatingError("unparsable_rating", f"judge answered {answer[:80]!r}, no digit 1-5")
    return int(m.group())


class JudgeScorer:
    """Builds the backend once; ``score`` returns one result (or exception) per sample."""

    def __init__(self, cfg: JudgeConfig):
        from megatron_sail.curate.backends import BackendConfig, make_backend

        if "{conversation}" not in cfg.prompt:
            raise ValueError("judge prompt: it must contain {conversation}")
        extra = {"api_base": cfg.api_base} if cfg.api_base else {}
        self.cfg = cfg
        self.backend = make_backend(
            BackendConfig(
                backend=cfg.backend,
                model=cfg.model,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size,
                **extra,
            )
        )
        self.writer = True

    def score(self, samples: list[Sample]) -> list:
        """{'score': rating, 'judge_answer': text} per sample, or the exception of a reject."""
        from megatron_sail.curate.backends import CaptionRequest

        out: list = [
            RatingError("no_image", "the judge backends need an image; this sample has none")
            if not s.images
            else None
            for s in samples
        ]
        todo = [i for i, s in enumerate(samples) if s.images]
        reqs = [
            CaptionRequest(
                samples[i].images[0],
                self.cfg.prompt.format(
                    conversation=conversation_text(samples[i], self.cfg.max_conversation_chars)
                ),
            )
            for i in todo
        ]
        for i, res in zip(todo, self.backend.caption(reqs) if reqs else []):
            if res.error:
                out[i] = RatingError("generation_error", res.error)
                continue
            try:
                out[i] = {"score": float(parse_rating(res.text)), "judge_answer": res.text.strip()[:80]}
            except RatingError as e:
                out[i] = e
        return out

    def close(self) -> None:
        self.backend.close()
