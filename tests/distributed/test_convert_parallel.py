"""A converted checkpoint loads at TP=2 and at PP=2 (gloo, 2 ranks) and gives the TP=1 logits;
tools/compare_logits.py end to end under torchrun, including a corrupted checkpoint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher import launch
from testkit import ROOT, subprocess_env

LAST_LINE = re.compile(r"^max_abs_logit_diff=(\S+) max_rel_logit_diff=(\S+)$")


def _our_logits_on_ranks(rank: int, mcore_dir: str, hf_dir: str, layout: dict):
    """Rank body: build at ``layout`` (ParallelConfig fields), load the converted checkpoint,
    return the logits on rank 0."""
    import argparse

    from megatron_sail.bench import compare_logits as cl
    from megatron_sail.checkpoint import dcp
    from megatron_sail.checkpoint.layout import read_model_config
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert.checkpoint import build_model_chunks
    from megatron_sail.platform import distributed

    parallel = ParallelConfig(**layout)
    distributed.initialize(parallel)
    cfg = read_model_config(mcore_dir)
    args = argparse.Namespace(image=[], max_tiles=4, prompt="What is in the picture?")
    inputs = cl.build_inputs(args, cfg, Path(hf_dir), Path(mcore_dir))
    chunks = build_model_chunks(cfg, parallel)
    dcp.load_model(chunks, mcore_dir)
    for c in chunks:
        c.eval()
    device = distributed.device()
    logits = cl.gather_to_rank0(
        cl.our_logits(chunks, inputs, device), (inputs.input_ids.numel(), cfg.language.vocab_size), device
    )
    distributed.shutdown()
    return logits


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """Tiny chat-layout checkpoints with a tokenizer (the prompt is real ChatML tokenization,
    <IMG_CONTEXT> id from tokenizer.json) and their conversions, in one subprocess: "qwen2" with
    3 LM layers (PP=2 splits unevenly), "qwen3_moe" (4 experts, top-2)."""
    root = tmp_path_factory.mktemp("conv")
    from megatron_sail.demo import tiny_checkpoint as tiny

    out, calls = {}, []
    for family, layers in (("qwen2", 3), ("qwen3_moe", 2)):
        hf = tiny.make_tiny_checkpoint(
            root / family / "hf",
            tiny.TinyCheckpointConfig(
                layout="chat", text_layers=layers, seed=5, vocab_size=320, tokenizer=True, text_family=family
            ),
        )
        out[family] = (hf, root / family / "mc")
        calls.append(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(root / family / "mc")])
    code = f"import convert_checkpoint as c\nfor argv in {calls!r}: assert c.main(argv) == 0"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def converted(conversions):
    """The Qwen2 checkpoint and its conversion."""
    return conversions["qwen2"]


@pytest.fixture(scope="module")
def reference(converted):
    hf, mc = converted
    [logits] = launch(_our_logits_on_ranks, 1, str(mc), str(hf), {})
    assert logits.shape[0] > 20 and torch.isfinite(logits).all()
    return logits


@pytest.mark.parametrize(
    "layout", [dict(tp=2), dict(pp=2, first_stage_layers=1, last_stage_layers=2)], ids=["tp2", "pp2_uneven"]
)
def test_converted_checkpoint_loads_at_other_parallel_layouts(converted, reference, layout):
    hf, mc = converted
    logits = launch(_our_logits_on_ranks, 2, str(mc), str(hf), layout)[0]
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)


def _compare(hf: Path, mc: Path, tp: int = 1) -> tuple[int, str]:
    """Run compare_logits under torchrun with ``tp`` ranks; return (exit code, output)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(tp),
        str(ROOT / "tools" / "compare_logits.py"),
        "--hf-dir",
        str(hf),
        "--mcore-dir",
        str(mc),
        "--max-tiles",
        "4",
        "--tp",
        str(tp),
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout


def test_compare_logits_passes_and_a_corrupted_checkpoint_fails(converted, tmp_path):
    hf, mc = converted
    code, out = _compare(hf, mc)
    last = out.strip().splitlines()[-1]
    m = LAST_LINE.match(last)
    assert m and code == 0, out[-2000:]
    assert ", tokenizer;" in out  # the ChatML prompt went through the checkpoint's tokenizer
    assert float(m.group(1)) < 1e-3

    # corrupt one projector weight of the HF side: the conversion no longer matches it
    from megatron_sail.convert import hf_io

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    state = hf_io.read_state_dict(bad)
    state["mlp1.1.weight"] = state["mlp1.1.weight"] * 1.5
    for f in bad.glob("*.safetensors*"):
        f.unlink()
    hf_io.write_safetensors(bad, state, max_shard_bytes=1 << 30)
    code, out = _compare(bad, mc)
    m = LAST_LINE.match(out.strip().splitlines()[-1])
    assert m and code == 1, out[-2000:]
    assert float(m.group(1)) > 1e-3


def test_compare_logits_qwen3_moe_at_tp2(conversions):
    """Qwen3-MoE: the expert tensors of the dist checkpoint load split over TP=2, and the tool
    builds transformers' reference from the per-expert checkpoint (fused in memory)."""
    code, out = _compare(*conversions["qwen3_moe"], tp=2)
    m = LAST_LINE.match(out.strip().splitlines()[-1])
    assert m and code == 0, out[-2000:]
    assert "tp=2 pp=1" in out and ", tokenizer;" in out
    assert float(m.group(1)) < 1e-4
