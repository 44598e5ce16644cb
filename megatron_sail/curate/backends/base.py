"""What every captioning backend takes and returns, and its config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

BACKENDS = ("megatron", "hf", "vllm", "openai")


@dataclass
class BackendConfig:
    """Which model captions and how it decodes (one config for all backends; each reads its part)."""

    backend: str = "megatron"
    """'megatron' (our checkpoints, inference/), 'hf' (transformers), 'vllm', 'openai' (HTTP)."""
    model: str = ""
    """Checkpoint folder (megatron, hf, vllm) or the served model name (openai)."""
    max_new_tokens: int = 256
    """Caption budget; a caption that reaches it without a stop token is ``truncated_caption``."""
    batch_size: int = 8
    """Images decoded together (megatron/hf/vllm) or requests in flight (openai)."""
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (temperature > 0)."""
    seed: int = 1234
    """Sampling seed (also sent to OpenAI-compatible servers)."""
    max_tiles: int = 12
    """Most tiles per image (megatron, hf)."""
    dtype: Optional[str] = None
    """Parameter dtype (megatron, hf, vllm); None: float32 on CPU, bfloat16 on GPU."""
    api_base: str = "http://localhost:8000/v1"
    """OpenAI-compatible server root (openai); ``/chat/completions`` is appended."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (openai); unset: no Authorization header."""
    max_retries: int = 5
    """Retries of a failed request (openai: HTTP 429/5xx, connection errors) before it is a reject."""
    backoff_s: float = 1.0
    """First retry delay; doubled at every retry (capped at 60 s)."""
    requests_per_second: float = 0.0
    """Rate limit of requests started per second by one worker (openai); 0: none."""
    timeout_s: float = 300.0
    """Per-request timeout (openai)."""
    tensor_parallel_size: int = 1
    """GPUs per vLLM engine."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(
                f"--max-new-tokens ({self.max_new_tokens}) and --batch-size ({self.batch_size}) must be >= 1"
            )
        if self.max_retries < 0 or self.backoff_s < 0 or self.requests_per_second < 0:
            raise ValueError("max_retries, backoff_s and requests_per_second must be >= 0")


@dataclass
class CaptionRequest:
    """One image and the instruction it is captioned with."""

    image: bytes
    """Encoded image bytes."""
    prompt: str
    """The instruction (from the prompt bank)."""


@dataclass
class CaptionResult:
    """A backend's answer for one image."""

    text: str = ""
    """The caption (stop token excluded)."""
    finish_reason: str = "stop"
    """'stop' (the model ended it) or 'length' (max_new_tokens reached: truncated)."""
    error: Optional[str] = None
    """Set when generation failed for this image (a ``generation_error`` reject)."""
    tokens: Optional[int] = None
    """Generated tokens, when the backend knows."""


class Backend:
    """A captioner: ``caption`` answers a batch in order; one failed image must not fail the rest."""

    name = "base"

    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg

    @property
    def model_id(self) -> str:
        """What provenance records as the model."""
        return self.cfg.model

    def caption(self, requests: list[CaptionRequest]) -> list[CaptionResult]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        """Release the model / connections."""


def per_item(fn, requests: list[CaptionRequest]) -> list[CaptionResult]:
    """Run a batch; when it raises, run its images one by one so only the bad ones fail."""
    try:
        return fn(requests)
    except Exception:  # noqa: BLE001 - attribute the failure below
        if len(requests) == 1:
            raise
    out = []
    for r in requests:
        try:
            out += fn([r])
        except Exception as e:  # noqa: BLE001 - any failure is this image's reject
            out.append(CaptionResult(error=f"{type(e).__name__}: {e}"))
    return out
