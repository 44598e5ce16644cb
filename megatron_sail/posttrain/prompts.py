"""Prompts with reference answers for stage grpo: JSONL records and VLMEvalKit TSVs.

A JSONL line is ``{image|images, question|prompt, answer[, choices]}``; a TSV row is prompted
as the evaluator prompts it (eval/prompts.py), so GRPO trains on the wording the benchmark
scores. A bad record is an error naming the file and line.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional


@dataclass
class PromptRecord:
    """One prompt with its reference answer."""

    prompt: str
    """User text (``<image>`` placeholders optional)."""
    images: list
    """Image paths or bytes."""
    answer: str
    """Reference answer."""
    choices: Optional[dict] = None
    """Option letter -> text for multiple choice."""
    source: str = ""
    """'<file>:<line or index>'."""

    def record(self) -> dict:
        """The dict reward functions see."""
        return {
            "question": self.prompt,
            "answer": self.answer,
            "choices": self.choices,
            "source": self.source,
        }


def read_prompts(paths: list[str], image_root: Optional[str] = None, suffix: str = "") -> list[PromptRecord]:
    """Prompts of JSONL files ({image|images, question|prompt, answer[, choices]}) and
    VLMEvalKit TSVs (prompted as the evaluator prompts them); a bad record is an error naming
    the file and line."""
    import json

    out: list[PromptRecord] = []
    for path in paths:
        if path.endswith(".tsv"):
            out += _tsv_prompts(path)
            continue
        base = image_root or os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not JSON ({e})") from None
                q, a = obj.get("question", obj.get("prompt")), obj.get("answer")
                if not isinstance(q, str) or a is None or str(a).strip() == "":
                    raise ValueError(f"{where}: needs a 'question' (or 'prompt') and an 'answer'")
                refs = obj.get("images", obj.get("image")) or []
                refs = refs if isinstance(refs, list) else [refs]
                images = [r if os.path.isabs(r) else os.path.join(base, r) for r in refs]
                out.append(PromptRecord(q, images, str(a), obj.get("choices"), where))
    if suffix:
        out = [dataclasses.replace(p, prompt=p.prompt + suffix) for p in out]
    if not out:
        raise ValueError(f"--data-path {paths}: no prompts")
    return out


def _tsv_prompts(path: str) -> list[PromptRecord]:
    """A VLMEvalKit TSV as prompts: MCQ rows (options A-D) with the MCQ prompt, yes/no and open
    rows with the question (POPE's prompt is the question)."""
    from megatron_sail.eval.prompts import mcq_prompt
    from megatron_sail.eval.score_mcq import choices_of
    from megatron_sail.eval.tsv import read_items

    out = []
    for it in read_items(path):
        choices = choices_of(it)
        text = mcq_prompt(it) if choices else it.get("question", "")
        out.append(
            PromptRecord(
                text, list(it.images), str(it.get("answer", "")), choices or None, f"{path}:{it.index}"
            )
        )
    return out
