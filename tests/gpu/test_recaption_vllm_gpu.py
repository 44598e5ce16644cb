"""GPU only: --backend vllm (offline batched vLLM) recaptions a shard of the tiny InternVL export
with the same greedy captions as the hf backend (transformers generate) in float32. Skips without
CUDA or without the optional package vllm."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (optional)"),
]


def _export(root: Path) -> str:
    """The tiny checkpoint completed like an export (tokenizer files + chat template, processor
    and generation configs), which vLLM needs to serve it."""
    from dataclasses import asdict

    from megatron_sail.checkpoint.processor import ProcessorSettings
    from megatron_sail.checkpoint.tokenizer import save_tokenizer
    from megatron_sail.convert.hf_assets import write_generation_config, write_processor_files
    from megatron_sail.inference import inspect_checkpoint
    from recaption_fixtures import tiny_checkpoint

    ckpt = tiny_checkpoint(root / "hf")
    ids = save_tokenizer(Path(ckpt) / "tokenizer.json", ckpt)
    write_processor_files(ckpt, ProcessorSettings(**asdict(inspect_checkpoint(ckpt).settings)))
    write_generation_config(ckpt, ids)
    return ckpt


def test_vllm_backend_matches_hf_backend(tmp_path):
    from megatron_sail.curate.backends import BackendConfig
    from megatron_sail.curate.recaption import RecaptionConfig, run
    from recaption_fixtures import read_output, write_shards

    ckpt = _export(tmp_path)
    write_shards(tmp_path / "in", 1, 6)
    out = {}
    for backend in ("vllm", "hf"):
        cfg = BackendConfig(backend, ckpt, max_new_tokens=12, batch_size=6, max_tiles=1, dtype="float32")
        summary = run(
            RecaptionConfig([str(tmp_path / "in" / "*.tar")], str(tmp_path / backend), cfg, progress=False)
        )
        assert summary["samples"] == 6 and not summary["failed_shards"], summary
        caps = {k: v["txt"].decode() for k, v in read_output(str(tmp_path / backend / "00000.tar")).items()}
        rej = [json.loads(x) for x in (tmp_path / backend / "00000.rejects.jsonl").read_text().splitlines()]
        out[backend] = (caps, sorted((r["key"], r["reason"], r["provenance"]["tokens"]) for r in rej))
    assert out["vllm"] == out["hf"]
