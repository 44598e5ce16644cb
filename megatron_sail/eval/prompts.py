"""Prompts per benchmark, built as VLMEvalKit's SAIL-VL wrapper (vlmeval/vlm/sail_vl.py, the
InternVL-chat family) builds them, so that our scores and VLMEvalKit's on an export compare."""

from __future__ import annotations

import re

from megatron_sail.eval.score_mcq import choices_of

SHORT_ANSWER = "Answer the question using a single word or phrase."
"""VQA suffix (after a newline) for OCR/document/chart sets; also MME's (after a space)."""
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
"""Multiple-choice suffix, after the options."""
MCQ_SUFFIX_CN = "请直接回答选项字母。"
"""The same for a Chinese question."""
OPEN_SUFFIX = "Answer the question directly."
"""A multiple-choice set's question without options (MMMU's open questions)."""
OPEN_SUFFIX_CN = "请直接回答问题。"
"""The same for a Chinese question."""
YES_NO = "Please answer yes or no."
"""HallusionBench's extra instruction."""

_CJK = re.compile(r"[\u4e00-\u9fff]")


def _is_chinese(text: str) -> bool:
    """VLMEvalKit's cn_string: any CJK ideograph."""
    return _CJK.search(text) is not None


def yes_no_prompt(item, style: str) -> str:
    """POPE: the question; MME: + ' Answer the question using a single word or phrase.';
    HallusionBench: + ' Please answer yes or no. Answer ...'."""
    q = item.get("question", "")
    if style == "mme":
        return f"{q} {SHORT_ANSWER}"
    if style == "hallusionbench":
        return f"{q} {YES_NO} {SHORT_ANSWER}"
    return q


def mcq_prompt(item) -> str:
    """Hint (when present), question, one 'X. option' line per option, then the
    answer-with-the-letter instruction (Chinese for a Chinese prompt)."""
    q = item.get("question", "")
    if item.get("hint"):
        q = item.get("hint") + "\n" + q
    options = choices_of(item)
    for k, v in options.items():
        q += f"\n{k}. {v}"
    if options:
        return q + "\n" + (MCQ_SUFFIX_CN if _is_chinese(q) else MCQ_SUFFIX)
    return q + "\n" + (OPEN_SUFFIX_CN if _is_chinese(q) else OPEN_SUFFIX)


def vqa_prompt(item) -> str:
    """The question, then '\\nAnswer the question using a single word or phrase.'."""
    return item.get("question", "") + "\n" + SHORT_ANSWER


def with_images(text: str, n_images: int) -> str:
    """Place the image tokens as the wrapper does: '<image>\\n' before the text for one image,
    'Image-1: <image>\\nImage-2: <image>\\n...' for several, nothing for none."""
    if n_images == 0:
        return text
    if n_images == 1:
        return "<image>\n" + text
    return "".join(f"Image-{i + 1}: <image>\n" for i in range(n_images)) + text
