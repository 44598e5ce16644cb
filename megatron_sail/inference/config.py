"""Public data types of generation: the run config, one request, one result (issue 9 contract)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class GenerationConfig:
    """How answers are decoded (shared by the CLI, the evaluator and the in-training hook)."""

    max_new_tokens: int = 256
    """Most tokens generated per prompt (a request may lower or raise it)."""
    temperature: float = 0.0
    """0 means greedy decoding (the default); > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    seed: int = 1234
    """Seed of the sampling generator (re-seeded at every ``generate`` call)."""
    max_tiles: int = 12
    """Most tiles per image (SAIL-VL default); tile size and thumbnail come from the checkpoint."""
    batch_size: int = 8
    """Prompts decoded together (one prefill + shared decode steps)."""
    system: Optional[str] = None
    """System prompt of the chat template; None keeps the template's own default."""
    min_new_tokens: int = 0
    """Stop tokens are ignored until this many tokens are generated (as transformers' option)."""
    stop_token_ids: Optional[tuple[int, ...]] = None
    """Ids that end an answer; None means <|im_end|> and <|endoftext|> of the tokenizer."""
    onednn_linear: bool = True
    """fp32 on CPU: large linear products through oneDNN instead of MKL's sgemm (1.5-2x faster
    on AMD EPYC, equal up to the summation order; platform/onednn_linear.py). False: F.linear
    everywhere, bit-identical to transformers' products."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.min_new_tokens < 0:
            raise ValueError(
                f"GenerationConfig: max_new_tokens ({self.max_new_tokens}) and "
                f"min_new_tokens ({self.min_new_tokens}) must be >= 0"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"GenerationConfig: temperature must be >= 0 (got {self.temperature}) "
                f"and top_p in (0, 1] (got {self.top_p})"
            )
        if self.batch_size < 1 or self.max_tiles < 1:
            raise ValueError(
                f"GenerationConfig: batch_size ({self.batch_size}) and max_tiles "
                f"({self.max_tiles}) must be >= 1"
            )


@dataclass
class GenerationRequest:
    """One prompt: user text and its images, in order."""

    prompt: str
    """User text; ``<image>`` placeholders mark where images go (prepended when absent)."""
    images: list = field(default_factory=list)
    """Image paths (str), encoded bytes, or PIL images."""
    max_new_tokens: Optional[int] = None
    """Overrides GenerationConfig.max_new_tokens for this prompt."""


@dataclass
class GenerationResult:
    """The answer to one request."""

    text: str
    """Decoded answer (stop token excluded)."""
    token_ids: list[int]
    """Generated ids, without the prompt and without the stop token."""
    prompt_ids: list[int]
    """The whole prompt as the model saw it, image context tokens included."""
    finish_reason: str = "stop"
    """'stop' (a stop token was generated) or 'length' (max_new_tokens reached)."""
