"""The model-free complexity score (``--method heuristic``).

Each question gets a type from its text and its answer's shape:

| type | detected by | weight |
|---|---|---|
| yes/no | the answer is yes or no | 1.0 |
| short | anything else with a short answer (an attribute, a name) | 1.5 |
| multiple choice | two or more option lines ``A.``/``B)`` in the question | 1.5 |
| caption | describe / caption / "what is in the image" | 2.0 |
| ocr | read / written / text / word / OCR | 2.0 |
| counting | how many / count / number of | 2.5 |
| open reasoning | why / explain / compare / step / relations (left of, above, ...) / 20+ word answer | 3.0 |

Answer-format lines ("Answer the question using a single word or phrase.") are dropped first. A
question takes its heaviest matching type; every further content type it matches
(caption, ocr, counting, reasoning: a multi-step question) adds 0.5. The sample's score is

    score = max over its questions of (type weight + 0.5 * extra content types)
            + 0.5 * log2(turns)                      # question/answer pairs
            + 0.5 * log2(1 + answer_words / 10)      # all answers together
            + 0.25 * log2(1 + question_words / 8)    # the longest question
            + 0.25 * max(0, images - 1)

so a one-turn yes/no question with a one-word answer scores about 1.3, a long multi-turn
reasoning conversation 5 or more. The weights are a documented guess, not a measurement:
compare with ``--method ifd`` on your data (docs/sft_curriculum.md)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from megatron_sail.curate.complexity.samples import Sample, qa_pairs

WEIGHTS = {
    "yes/no": 1.0,
    "short": 1.5,
    "mcq": 1.5,
    "caption": 2.0,
    "ocr": 2.0,
    "counting": 2.5,
    "reasoning": 3.0,
}
"""Weight of each question type (the table above)."""
CONTENT = ("caption", "ocr", "counting", "reasoning")
"""Types read from what is asked (several can match one question)."""
_PATTERNS = {
    "caption": re.compile(
        r"\b(describe|description|caption|what is (in|shown in) the (image|picture)|"
        r"what do you see)\b",
        re.I,
    ),
    "ocr": re.compile(r"\b(read|written|text|word|words|ocr|spell|says?)\b", re.I),
    "counting": re.compile(r"\b(how many|count|number of)\b", re.I),
    "reasoning": re.compile(
        r"\b(why|explain|reason|compare|step|steps|infer|left of|right of|above|below|"
        r"behind|next to|between|same \w+ as|more than|less than|larger|smaller|"
        r"bigger|if)\b",
        re.I,
    ),
}
_FORMAT = re.compile(r"^\s*answer (the question|with)\b.*$", re.I | re.M)
"""Answer-format instructions ("Answer the question using a single word or phrase.", "Answer
with the option's letter ..."): they say how to answer, not what is asked, and are dropped."""
_OPTION = re.compile(r"^\s*[A-H][.)]\s", re.M)
_YES_NO = re.compile(r"^(yes|no)\b[.!]?", re.I)


@dataclass(frozen=True)
class HeuristicConfig:
    """Weights of the score's parts besides the question type."""

    turns: float = 0.5
    """Per doubling of question/answer pairs."""
    answer: float = 0.5
    """Per doubling of (1 + answer words / 10)."""
    question: float = 0.25
    """Per doubling of (1 + words of the longest question / 8)."""
    images: float = 0.25
    """Per image beyond the first."""
    extra_type: float = 0.5
    """Per further content type one question matches (multi-step)."""
    long_answer_words: int = 20
    """An answer at least this long makes the question open reasoning."""


def question_types(question: str, answer: str, cfg: HeuristicConfig = HeuristicConfig()) -> list[str]:
    """Every type a question/answer pair matches, heaviest first."""
    asked = _FORMAT.sub("", question)
    found = [t for t in CONTENT if _PATTERNS[t].search(asked)]
    if len(answer.split()) >= cfg.long_answer_words and "reasoning" not in found:
        found.append("reasoning")
    if len(_OPTION.findall(question)) >= 2:
        found.append("mcq")
    if _YES_NO.match(answer.strip()) and len(answer.split()) <= 3:
        found.append("yes/no")
    if not found:
        found.append("short")
    return sorted(set(found), key=lambda t: -WEIGHTS[t])


def pair_score(question: str, answer: str, cfg: HeuristicConfig = HeuristicConfig()) -> tuple[float, str]:
    """(type weight + extra content types, the pair's type)."""
    types = question_types(question, answer, cfg)
    extra = max(0, sum(t in CONTENT for t in types) - 1)
    return WEIGHTS[types[0]] + cfg.extra_type * extra, types[0]


def heuristic_score(sample: Sample, cfg: HeuristicConfig = HeuristicConfig()) -> dict:
    """{'score': float, 'type': the hardest question's type, 'turns', 'answer_words', 'images'}."""
    pairs = qa_pairs(sample.turns)
    if not pairs:
        raise ValueError("no question/answer pair")
    scored = [pair_score(q, a, cfg) for q, a in pairs]
    best, kind = max(scored, key=lambda s: s[0])
    answer_words = sum(len(a.split()) for _, a in pairs)
    question_words = max(len(_FORMAT.sub("", q).split()) for q, _ in pairs)
    score = (
        best
        + cfg.turns * math.log2(len(pairs))
        + cfg.answer * math.log2(1 + answer_words / 10)
        + cfg.question * math.log2(1 + question_words / 8)
        + cfg.images * max(0, len(sample.images) - 1)
    )
    return {
        "score": round(score, 6),
        "type": kind,
        "turns": len(pairs),
        "answer_words": answer_words,
        "images": len(sample.images),
    }


class HeuristicScorer:
    """The runner's interface (``score(samples)`` -> result or exception per sample)."""

    writer = True

    def __init__(self, cfg: HeuristicConfig = HeuristicConfig()):
        self.cfg = cfg

    def score(self, samples: list[Sample]) -> list:
        out: list = []
        for s in samples:
            try:
                out.append(heuristic_score(s, self.cfg))
            except ValueError as e:
                out.append(e)
        return out
