"""Captions from any OpenAI-compatible chat server (``vllm serve`` of an export, a commercial VLM).

The API key is read from an environment variable, never from a flag or a file. A request that
fails with HTTP 429 / 5xx or a connection error is retried with exponential backoff, at most
``max_retries`` times; other HTTP errors fail at once. Requests start at most
``requests_per_second`` per second; ``batch_size`` of them are in flight together.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from megatron_sail.curate.backends.base import Backend, BackendConfig, CaptionRequest, CaptionResult
from megatron_sail.curate.backends.vllm import image_data_uri

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)


class RateLimiter:
    """Spaces request starts at least 1/rate seconds apart (thread-safe); rate 0: no limit."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            time.sleep(start - now)


class OpenAIBackend(Backend):
    """POST /chat/completions with the image as a data URI; one request per image."""

    name = "openai"

    def __init__(self, cfg: BackendConfig):
        super().__init__(cfg)
        if not cfg.model:
            raise ValueError("--backend openai: --model names the served model")
        self.url = cfg.api_base.rstrip("/") + "/chat/completions"
        self.key = os.environ.get(cfg.api_key_env) or None
        self.limiter = RateLimiter(cfg.requests_per_second)
        self.pool = ThreadPoolExecutor(max_workers=cfg.batch_size)
        self.retries = 0
        """Retries made over the backend's life (reported in the summary)."""

    def caption(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        return list(self.pool.map(self._one, requests))

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _body(self, r: CaptionRequest) -> bytes:
        return json.dumps(
            {
                "model": self.cfg.model,
                "max_tokens": self.cfg.max_new_tokens,
                "temperature": self.cfg.temperature,
                "top_p": self.cfg.top_p,
                "seed": self.cfg.seed,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": image_data_uri(r.image)}},
                            {"type": "text", "text": r.prompt},
                        ],
                    }
                ],
            }
        ).encode()

    def _one(self, r: CaptionRequest) -> CaptionResult:
        """One image: bounded retries with exponential backoff; the last error is the reject."""
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        body, error = self._body(r), ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.retries += 1
                time.sleep(min(self.cfg.backoff_s * 2 ** (attempt - 1), 60.0))
            self.limiter.wait()
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    return _parse(json.loads(resp.read()))
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code} from {self.url}: {e.read()[:200].decode('utf-8', 'replace')}"
                if e.code not in RETRY_STATUS:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                error = f"{type(e).__name__} talking to {self.url}: {e}"
            except (ValueError, KeyError, IndexError, TypeError) as e:  # a malformed answer: no retry
                error = f"malformed response from {self.url}: {type(e).__name__}: {e}"
                break
        else:
            error += f" (after {self.cfg.max_retries} retries)"
        return CaptionResult(error=error)


def _parse(answer: dict) -> CaptionResult:
    """A chat completion's first choice."""
    choice = answer["choices"][0]
    text = choice["message"]["content"]
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    tokens = (answer.get("usage") or {}).get("completion_tokens")
    return CaptionResult(text, "length" if choice.get("finish_reason") == "length" else "stop", None, tokens)
