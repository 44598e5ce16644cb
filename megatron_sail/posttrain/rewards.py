"""Reward functions of stage grpo: each maps (completion text, prompt record) to a float.

* ``accuracy``: the final answer (``\\boxed{..}`` if present, else ``<answer>..</answer>``, else
  the text after ``</think>``, else all of it) judged by the benchmark matchers of eval/:
  yes/no (VLMEvalKit's YOrN extraction), option letter (its can_infer), number (equal as
  numbers), otherwise the VQA normalized exact match. 1.0 or 0.0.
* ``format``: 1.0 when the completion is ``<think>...</think>`` followed by a non-empty answer
  (SAIL-VL2's thinking format), else 0.0.
* ``boxed``: 1.0 when the answer is given in ``\\boxed{}`` (SAIL-VL2's CoT prompt asks for it).
* ``length``: ``-length_penalty * max(0, tokens - length_target)``.
* ``judge``: an OpenAI-compatible chat endpoint is asked whether the answer matches the
  reference; 1.0 for a reply starting with "yes" (unreachable endpoint: an error naming it).
* ``module:function``: a user function ``f(completion: str, record: dict) -> float``.

The total reward is the weighted sum (``--reward-weights``, default 1 each); every function's
mean and std are logged under its name.
"""

from __future__ import annotations

import importlib
import json
import re
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_sail.eval.matching import extract_yes_no, infer_option
from megatron_sail.eval.score_vqa import normalized_match

_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*(\S.*)$", re.S)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (nested braces balanced), None when absent."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def final_answer(text: str) -> str:
    """The part of a completion that states the answer (see the module docstring)."""
    b = boxed(text)
    if b is not None:
        return b
    m = _ANSWER_TAG.search(text)
    if m:
        return m.group(1).strip()
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].strip()
    return text.strip()


def answer_kind(record: dict) -> str:
    """yorn, mcq, number or vqa, from the record's choices and reference answer."""
    if record.get("answer_type"):
        return str(record["answer_type"])
    if record.get("choices"):
        return "mcq"
    gold = str(record.get("answer", "")).strip()
    if gold.lower() in ("yes", "no"):
        return "yorn"
    if _NUMBER.fullmatch(gold):
        return "number"
    return "vqa"


def is_correct(prediction: str, record: dict) -> bool:
    """Whether a final answer matches the record's reference, by the benchmark rule of its kind."""
    gold = str(record.get("answer", "")).strip()
    kind = answer_kind(record)
    if kind == "yorn":
        return extract_yes_no(prediction) == gold.capitalize()
    if kind == "mcq":
        return infer_option(prediction, record["choices"]) == gold.upper()
    if kind == "number":
        found = _NUMBER.findall(prediction)
        return len(found) >= 1 and float(found[-1]) == float(gold)
    return normalized_match([gold], prediction) == 1.0


def accuracy(text: str, record: dict, **_) -> float:
    """1.0 when the final answer is right."""
    return float(is_correct(final_answer(text), record))


def think_format(text: str, record: dict = None, **_) -> float:
    """1.0 for ``<think>reasoning</think> answer``."""
    return float(_THINK.match(text) is not None)


def boxed_format(text: str, record: dict = None, **_) -> float:
    """1.0 when the answer is boxed."""
    return float(boxed(text) is not None)


@dataclass(frozen=True)
class RewardSettings:
    """Parameters some reward functions need."""

    length_target: int = 0
    """Tokens allowed before the length penalty starts."""
    length_penalty: float = 0.01
    """Penalty per token beyond length_target."""
    judge_url: Optional[str] = None
    """OpenAI-compatible base URL of the judge."""
    judge_model: Optional[str] = None
    """Judge model name."""
    timeout_s: float = 60.0
    """Judge request timeout."""


def length(
    text: str, record: dict, tokens: int = 0, settings: RewardSettings = RewardSettings(), **_
) -> float:
    """Minus the penalty for tokens beyond the target."""
    return -settings.length_penalty * max(0, tokens - settings.length_target)


def judge(text: str, record: dict, settings: RewardSettings = RewardSettings(), **_) -> float:
    """1.0 when the judge says the answer matches the reference."""
    if not settings.judge_url:
        raise ValueError("--reward judge needs --judge-url (an OpenAI-compatible endpoint)")
    prompt = (
        f"Question: {record.get('question', '')}\nReference answer: "
        f"{record.get('answer', '')}\nCandidate answer: {final_answer(text)}\n"
        "Does the candidate answer mean the same as the reference? Reply yes or no."
    )
    body = json.dumps(
        {
            "model": settings.judge_model or "judge",
            "temperature": 0,
            "messages": [{"role": "user", "content": prompt}],
        }
    ).encode()
    url = settings.judge_url.rstrip("/") + "/chat/completions"
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=settings.timeout_s) as resp:
            reply = json.loads(resp.read().decode())["choices"][0]["message"]["content"]
    except (OSError, KeyError, IndexError, ValueError) as e:
        raise RuntimeError(f"--judge-url {url}: no usable reply ({e})") from e
    return float(reply.strip().lower().startswith("yes"))


BUILTIN: dict[str, Callable] = {
    "accuracy": accuracy,
    "format": think_format,
    "boxed": boxed_format,
    "length": length,
    "judge": judge,
}


def resolve(name: str) -> Callable:
    """A reward function by built-in name or ``module:function``."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"--reward {name!r}: expected one of {', '.join(BUILTIN)} or module:function")
    module, func = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--reward {name}: cannot import it ({e})") from e
    if not callable(fn):
        raise ValueError(f"--reward {name}: not callable")
    return lambda text, record, **_: float(fn(text, record))


class RewardSet:
    """The run's reward functions and weights; scores completions per function."""

    def __init__(self, names: list[str], weights: list[float], settings: RewardSettings):
        self.names = list(names)
        self.fns = [resolve(n) for n in names]
        self.weights = list(weights) if weights else [1.0] * len(names)
        self.settings = settings

    def score(self, texts: list[str], records: list[dict], tokens: list[int]):
        """(total [N], per-function {name: [N]}) for completions and their prompt records."""
        per = {
            n: [float(fn(t, r, tokens=k, settings=self.settings)) for t, r, k in zip(texts, records, tokens)]
            for n, fn in zip(self.names, self.fns)
        }
        total = [sum(w * per[n][i] for n, w in zip(self.names, self.weights)) for i in range(len(texts))]
        return total, per
