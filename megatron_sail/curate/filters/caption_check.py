"""Caption checks: length in words, n-gram repetition (a looping captioner), refusals and
boilerplate, language."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from megatron_sail.curate.filters.base import FilterSample, FilterStage, Reject

WORD = re.compile(r"\w+(?:'\w+)?", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased words (punctuation dropped), the unit of every caption check."""
    return WORD.findall(text.lower())


@dataclass
class CaptionLengthConfig:
    """Caption length bounds, in words."""

    enabled: bool = True
    """Run this stage."""
    min_words: int = 3
    """Fewer words: ``too_short`` (empty captions are ``no_caption``)."""
    max_words: int = 400
    """More words: ``too_long`` (a captioner that never stopped)."""


class CaptionLength(FilterStage):
    """Rejects missing, empty, too short and too long captions; records the length."""

    name = "caption_length"

    def __init__(self, cfg: CaptionLengthConfig):
        self.cfg = cfg

    def process(self, sample: FilterSample) -> Optional[Reject]:
        if sample.caption is None or not sample.caption.strip():
            return Reject(
                "no_caption", "no txt/caption member" if sample.caption is None else "empty caption"
            )
        n = len(words(sample.caption))
        sample.scores["caption_words"] = n
        if n < self.cfg.min_words:
            return Reject("too_short", f"{n} words < {self.cfg.min_words}")
        if n > self.cfg.max_words:
            return Reject("too_long", f"{n} words > {self.cfg.max_words}")
        return None


@dataclass
class RepetitionConfig:
    """How much n-gram repetition a caption may have before it counts as a loop."""

    enabled: bool = True
    """Run this stage."""
    n: int = 3
    """n-gram length in words."""
    max_duplicate_fraction: float = 0.3
    """Largest share of the caption's n-grams that may be repeats of an earlier one."""
    min_ngrams: int = 4
    """Shorter captions are not judged (a few words cannot loop meaningfully)."""


def duplicate_ngram_fraction(tokens: list[str], n: int) -> float:
    """Share of n-gram occurrences that repeat an earlier one: 0 for varied text, close to 1
    for "a cat a cat a cat ..." (the signature of a captioner stuck in a loop)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(Counter(grams)) / len(grams)


class Repetition(FilterStage):
    """Rejects looping captions by their share of repeated n-grams."""

    name = "repetition"

    def __init__(self, cfg: RepetitionConfig):
        self.cfg = cfg

    def process(self, sample: FilterSample) -> Optional[Reject]:
        tokens = words(sample.caption or "")
        if len(tokens) - self.cfg.n + 1 < self.cfg.min_ngrams:
            return None
        frac = duplicate_ngram_fraction(tokens, self.cfg.n)
        sample.scores["repetition"] = frac
        if frac > self.cfg.max_duplicate_fraction:
            return Reject(
                "repetition", f"{frac:.2f} of {self.cfg.n}-grams repeated > {self.cfg.max_duplicate_fraction}"
            )
        return None


DEFAULT_REFUSALS = [
    r"\bi'?m sorry\b",
    r"\bi am sorry\b",
    r"\bi (?:cannot|can ?not|can't|am unable to|'m unable to)\b",
    r"\bas an ai\b",
    r"\b(?:language|ai) model\b",
    r"\bunable to (?:see|view|describe|identify|process)\b",
    r"\bno image (?:was |is )?(?:provided|attached|available)\b",
    r"\bi don'?t see (?:an|any) image\b",
]
"""Phrases of a captioner declining or failing (matched case-insensitively)."""
DEFAULT_BOILERPLATE = [
    r"\bstock (?:photo|image|footage)\b",
    r"\bshutterstock\b",
    r"\bgetty images\b",
    r"\balamy\b",
    r"\bdreamstime\b",
    r"\ball rights reserved\b",
    r"\bclick here\b",
    r"\bimage may contain\b",
    r"\blorem ipsum\b",
    r"\bplaceholder\b",
    r"\bdownload (?:free|now)\b",
    r"\broyalty[- ]free\b",
    r"\.(?:jpe?g|png|webp)\b",
    r"<unk>|<\|[a-z_]+\|>",
]
"""Web alt-text and template leftovers that say nothing about the image."""


@dataclass
class RefusalConfig:
    """Patterns (Python regexes, case-insensitive) that reject a caption."""

    enabled: bool = True
    """Run this stage."""
    refusal_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSALS))
    """A match: ``refusal``."""
    boilerplate_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_BOILERPLATE))
    """A match: ``boilerplate``."""


class Refusal(FilterStage):
    """Rejects refusals and boilerplate by pattern; the matched text is the detail."""

    name = "refusal"

    def __init__(self, cfg: RefusalConfig):
        self.cfg = cfg
        self.refusal = [re.compile(p, re.IGNORECASE) for p in cfg.refusal_patterns]
        self.boilerplate = [re.compile(p, re.IGNORECASE) for p in cfg.boilerplate_patterns]

    def process(self, sample: FilterSample) -> Optional[Reject]:
        text = (sample.caption or "").replace("\u2019", "'")
        for reason, patterns in (("refusal", self.refusal), ("boilerplate", self.boilerplate)):
            for pat in patterns:
                m = pat.search(text)
                if m:
                    return Reject(reason, f"matched {m.group(0)!r}")
        return None


@dataclass
class LanguageConfig:
    """Which caption languages are kept (langid.py: an offline n-gram model shipped with it)."""

    enabled: bool = True
    """Run this stage."""
    languages: list[str] = field(default_factory=lambda: ["en"])
    """ISO 639-1 codes to keep."""
    min_probability: float = 0.5
    """A caption is kept when langid gives one of ``languages`` at least this probability."""
    min_words: int = 3
    """Shorter captions are not judged (too little text for a reliable guess)."""


_IDENTIFIER = None


def language_identifier():
    """langid's identifier with normalised probabilities, built once per process (decoding its
    bundled model takes seconds)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from langid.langid import LanguageIdentifier, model

        _IDENTIFIER = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return _IDENTIFIER


class Language(FilterStage):
    """Rejects captions whose language is not one of ``languages``."""

    name = "language"

    def __init__(self, cfg: LanguageConfig):
        self.cfg = cfg
        self.ident = language_identifier()
        self.keep = set(cfg.languages)

    def process(self, sample: FilterSample) -> Optional[Reject]:
        text = sample.caption or ""
        if len(words(text)) < self.cfg.min_words:
            return None
        lang, prob = self.ident.classify(text)
        p_keep = prob if lang in self.keep else 0.0
        sample.scores["language_probability"] = p_keep
        if p_keep < self.cfg.min_probability:
            return Reject(
                "language", f"{lang} ({prob:.2f}), want {sorted(self.keep)} >= {self.cfg.min_probability}"
            )
        return None
