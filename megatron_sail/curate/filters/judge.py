"""Caption-quality judging as in SAIL-Caption2: a VLM scores each (image, caption) pair for
visual information richness (VIR, 1-5) and image-text alignment (ITA, yes/no); captions under
``min_vir`` or judged "no" are dropped (SAIL-Caption2's defaults: keep VIR >= 3 and ITA yes).

The judge runs through the recaption backends (megatron, hf, vllm, openai), so any captioner
checkpoint, export or served model can judge. Both questions go to the model as one batch of two
requests per sample; a reply that does not parse is a ``judge_unparseable`` reject that quotes
it, never a crash. The scores are written into the kept sample's ``json`` member under
``judge`` (``vir``, ``ita``, ``model``) and into the report's histograms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from megatron_sail.curate.backends import BACKENDS, BackendConfig, CaptionRequest, make_backend
from megatron_sail.curate.filters.base import FilterSample, FilterStage, Reject

VIR_PROMPT = (
    'Here is a caption written for this image:\n"{caption}"\n\n'
    "How much of the visual information in the image does the caption convey? Rate it from 1 to 5:\n"
    "1 - almost nothing (a few generic words);\n"
    "2 - the main subject only;\n"
    "3 - the main objects with some of their attributes;\n"
    "4 - most objects, attributes, positions and any visible text;\n"
    "5 - every object, attribute, count, spatial relation and piece of text, in detail.\n"
    "Answer with a single digit from 1 to 5."
)
"""The VIR question ({caption} is replaced). The scale follows SAIL-Caption2's description of
visual information richness: how complete and detailed the caption is about the image."""
ITA_PROMPT = (
    'Here is a caption written for this image:\n"{caption}"\n\n'
    "Is everything the caption says actually true of the image, with no object, attribute or text "
    "that is not there? Answer yes or no."
)
"""The ITA question: alignment means no hallucinated content, whatever the level of detail."""

_INT = re.compile(r"(?<![\d.])(\d+)(?!\d|\.\d)")
_WORD = re.compile(r"[a-z]+")


def parse_vir(reply: str) -> Optional[int]:
    """The first standalone integer of the reply when it is 1-5 ("4", "Score: 4/5", "4 - most
    objects"), else None."""
    m = _INT.search(reply)
    if m is None:
        return None
    v = int(m.group(1))
    return v if 1 <= v <= 5 else None


def parse_ita(reply: str) -> Optional[bool]:
    """True for a yes, False for a no: the first word when it is one of them, else the only one of
    the two words the reply contains; None when the reply has neither or both."""
    words = _WORD.findall(reply.lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0] == "yes"
    found = {w for w in words if w in ("yes", "no")}
    return (found == {"yes"}) if len(found) == 1 else None


@dataclass
class JudgeConfig:
    """Which model judges, how, and the thresholds."""

    enabled: bool = False
    """Off by default: it needs a model."""
    backend: str = "megatron"
    """One of the recaption backends: megatron, hf, vllm, openai."""
    model: str = ""
    """Checkpoint folder (megatron, hf, vllm) or served model name (openai)."""
    min_vir: int = 3
    """Lowest kept VIR score (SAIL-Caption2: 3)."""
    require_ita: bool = True
    """Drop captions the judge calls not aligned (SAIL-Caption2: yes)."""
    vir_prompt: str = VIR_PROMPT
    """The VIR question; ``{caption}`` is replaced by the caption."""
    ita_prompt: str = ITA_PROMPT
    """The ITA question; ``{caption}`` is replaced by the caption."""
    max_caption_chars: int = 4000
    """Longer captions are cut before they go into the prompts."""
    max_new_tokens: int = 8
    """Reply budget (a digit or a yes/no)."""
    max_tiles: int = 6
    """Tiles per image (megatron, hf)."""
    dtype: Optional[str] = None
    """Parameter dtype (None: float32 on CPU, bfloat16 on GPU)."""
    api_base: str = "http://localhost:8000/v1"
    """OpenAI-compatible server (openai)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (openai)."""
    tensor_parallel_size: int = 1
    """GPUs per vLLM engine."""

    def backend_config(self) -> BackendConfig:
        if self.backend not in BACKENDS:
            raise ValueError(f"judge.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not self.model:
            raise ValueError("judge.model: give the judge's checkpoint folder or served model name")
        return BackendConfig(
            backend=self.backend,
            model=self.model,
            max_new_tokens=self.max_new_tokens,
            batch_size=2,
            temperature=0.0,
            max_tiles=self.max_tiles,
            dtype=self.dtype,
            api_base=self.api_base,
            api_key_env=self.api_key_env,
            tensor_parallel_size=self.tensor_parallel_size,
        )


class Judge(FilterStage):
    """Asks the VIR and ITA questions about each sample; rejects by the thresholds."""

    name = "judge"

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.backend = make_backend(cfg.backend_config())

    def process(self, sample: FilterSample) -> Optional[Reject]:
        caption = (sample.caption or "")[: self.cfg.max_caption_chars]
        image = sample.image_bytes or b""
        vir_res, ita_res = self.backend.caption(
            [
                CaptionRequest(image, self.cfg.vir_prompt.replace("{caption}", caption)),
                CaptionRequest(image, self.cfg.ita_prompt.replace("{caption}", caption)),
            ]
        )
        for what, res in (("VIR", vir_res), ("ITA", ita_res)):
            if res.error is not None:
                return Reject("judge_error", f"{what}: {res.error}"[:300])
        vir, ita = parse_vir(vir_res.text), parse_ita(ita_res.text)
        sample.record["judge"] = {
            "vir": vir,
            "ita": None if ita is None else ("yes" if ita else "no"),
            "model": self.backend.model_id,
        }
        if vir is None:
            return Reject("judge_unparseable", f"VIR reply {vir_res.text[:120]!r} has no score 1-5")
        if ita is None:
            return Reject("judge_unparseable", f"ITA reply {ita_res.text[:120]!r} is not yes or no")
        sample.scores["judge_vir"] = vir
        sample.scores["judge_ita"] = int(ita)
        if vir < self.cfg.min_vir:
            return Reject("judge_low_vir", f"VIR {vir} < {self.cfg.min_vir}")
        if self.cfg.require_ita and not ita:
            return Reject("judge_not_aligned", "ITA: no")
        return None

    def close(self) -> None:
        self.backend.close()
