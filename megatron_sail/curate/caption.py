"""Caption stage: prompt-bank instruction per image -> backend -> caption or reject reason.

Reject reasons: ``undecodable_image`` (PIL cannot decode it: checked before the backend sees
it), ``generation_error`` (the backend failed on that image), ``empty_caption`` (nothing but
whitespace), ``truncated_caption`` (max_new_tokens reached without a stop token); reader
reasons (``missing_image``, ``file_too_large``, ...) pass through from data/preprocess/formats.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_sail.curate.backends import Backend, CaptionRequest
from megatron_sail.curate.prompts import PromptBank
from megatron_sail.curate.reader import Sample


@dataclass
class Captioned:
    """The outcome for one sample: a caption, or a reject reason (with what was generated)."""

    sample: Sample
    caption: Optional[str]
    provenance: dict
    reason: Optional[str] = None
    detail: str = ""


class CaptionStage:
    """Runs a backend over a batch of decodable samples and classifies each answer."""

    def __init__(self, backend: Backend, bank: PromptBank, settings: dict):
        self.backend = backend
        self.bank = bank
        self.settings = settings
        """Run-wide provenance fields (model, backend, seed, decoding settings)."""

    def run(self, shard: str, samples: list[Sample]) -> list[Captioned]:
        picks = [self.bank.pick(shard, s.key) for s in samples]
        results = self.backend.caption([CaptionRequest(s.image, p) for s, (_, p) in zip(samples, picks)])
        if len(results) != len(samples):
            raise RuntimeError(
                f"backend {self.backend.name} returned {len(results)} answers for {len(samples)} images"
            )
        out = []
        for s, (index, prompt), res in zip(samples, picks, results):
            prov = dict(
                self.settings,
                prompt=prompt,
                prompt_index=index,
                finish_reason=res.finish_reason,
                tokens=res.tokens,
            )
            if res.error is not None:
                out.append(Captioned(s, None, prov, "generation_error", res.error))
            elif not res.text.strip():
                out.append(Captioned(s, None, prov, "empty_caption", f"the model answered {res.text!r}"))
            elif res.finish_reason == "length":
                out.append(
                    Captioned(
                        s,
                        None,
                        prov,
                        "truncated_caption",
                        f"reached max_new_tokens without a stop token: {res.text[-200:]!r}",
                    )
                )
            else:
                out.append(Captioned(s, res.text.strip(), prov))
        return out
