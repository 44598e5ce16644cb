"""Offline batched captioning on GPUs with vLLM (InternVL-family models; optional dependency).

The throughput path for SAIL-Caption-scale runs: vLLM's continuous batching and paged KV cache
keep a GPU busy with hundreds of images in flight. Requests go through ``LLM.chat`` with the
image as a data URI, so the model's own chat template and image placeholder are used.
"""

from __future__ import annotations

import base64

from megatron_sail.checkpoint.layout import HF_CONFIG
from megatron_sail.curate.backends.base import Backend, BackendConfig, CaptionRequest, CaptionResult, per_item


def image_data_uri(data: bytes) -> str:
    """A data: URI of encoded image bytes, with the MIME type sniffed from the header."""
    head = data[:12]
    mime = (
        "image/png"
        if head.startswith(b"\x89PNG")
        else "image/webp"
        if head[8:12] == b"WEBP"
        else "image/gif"
        if head[:3] == b"GIF"
        else "image/jpeg"
    )
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _processor_kwargs(cfg: BackendConfig) -> dict:
    """--max-tiles for InternVL-chat folders (vLLM's own InternVL processor reads
    max_dynamic_patch); transformers-layout folders keep their preprocessor_config.json."""
    import json
    import os

    try:
        with open(os.path.join(cfg.model, HF_CONFIG), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError):
        return {}
    return (
        {"mm_processor_kwargs": {"max_dynamic_patch": cfg.max_tiles}} if model_type == "internvl_chat" else {}
    )


class VLLMBackend(Backend):
    """vllm.LLM on an exported folder (``--model DIR``), one engine per worker (one GPU each)."""

    name = "vllm"

    def __init__(self, cfg: BackendConfig):
        super().__init__(cfg)
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise ImportError(
                "--backend vllm needs the optional package vllm (pip install vllm on a "
                "GPU machine); it is not installed here"
            ) from e
        self.llm = LLM(
            model=cfg.model,
            trust_remote_code=True,
            seed=cfg.seed,
            dtype=cfg.dtype or "auto",
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_num_seqs=max(cfg.batch_size, 1),
            limit_mm_per_prompt={"image": 1},
            **_processor_kwargs(cfg),
        )
        self.params = SamplingParams(
            max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed
        )

    def caption(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        return per_item(self._generate, requests)

    def _generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        chats = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_data_uri(r.image)}},
                        {"type": "text", "text": r.prompt},
                    ],
                }
            ]
            for r in requests
        ]
        outs = self.llm.chat(chats, self.params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            results.append(
                CaptionResult(
                    c.text, "length" if c.finish_reason == "length" else "stop", None, len(c.token_ids)
                )
            )
        return results
