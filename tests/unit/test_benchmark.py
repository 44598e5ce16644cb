"""tools/benchmark.py and benchmarks/hf_reference.py on the tiny recipe (CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sail.bench import training_step as bench
from megatron_sail.bench.hf_reference import restarting_positions  # what transformers gets for packed rows
from megatron_sail.config.model import tiny
from megatron_sail.training import flops as F
from testkit import ROOT, subprocess_env


def _run(script, tmp_path, *extra):
    out = tmp_path / f"{Path(script).stem}.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / script),
            "--recipe",
            "tiny",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--split-steps",
            "1",
            "--json",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines(), json.loads(out.read_text())


def test_synthetic_batch_layout():
    cfg = tiny()
    gen = torch.Generator().manual_seed(0)
    b = bench.synthetic_micro_batch(cfg, 64, rows=2, tiles_per_row=3, samples_per_row=2, gen=gen)
    tpt = cfg.tokens_per_tile()
    assert b.tokens.shape == (2, 64) and b.tiles.shape == (6, 3, 32, 32)
    assert (b.tokens == cfg.img_context_token_id).sum(1).tolist() == [3 * tpt, 3 * tpt]
    assert b.cu_seqlens.tolist() == [0, 32, 64, 96, 128]
    pos = restarting_positions(b.cu_seqlens, 2, 64)
    assert pos[0, :3].tolist() == [0, 1, 2] and pos[0, 32].item() == 0 and pos[1, 31].item() == 31
    assert pos[1, 32:].tolist() == list(range(32))
    # sample 0 holds 2 tiles right after its first token; no loss on images or a sample's last token
    assert (b.tokens[0, 1 : 1 + 2 * tpt] == cfg.img_context_token_id).all()
    assert b.loss_mask[0, : 1 + 2 * tpt].sum() == 0 and b.loss_mask[0, 31] == 0 and b.loss_mask[0, 30] == 1
    assert b.labels[0, 5].item() == b.tokens[0, 6].item() and b.labels[0, 31].item() == 0
    with pytest.raises(ValueError, match="cannot hold"):
        bench.synthetic_micro_batch(cfg, 16, rows=1, tiles_per_row=8, samples_per_row=1, gen=gen)


def test_benchmark_tiny_cpu(tmp_path):
    lines, res = _run("tools/benchmark.py", tmp_path, "--samples-per-row", "2")
    assert lines[-5].startswith("tokens/s: ") and lines[-4].startswith("TFLOP/s per GPU: ")
    assert lines[-3].startswith("MFU: n/a") and lines[-2].startswith("peak memory: ")
    assert lines[-1].startswith("step split: vit+projector ")
    seq = res["seq_length"]
    assert res["tokens_per_s"] == pytest.approx(seq / res["step_time_s"], rel=1e-6)
    assert float(lines[-5].split()[1]) == pytest.approx(res["tokens_per_s"], abs=0.1)
    # FLOPs of the work: two samples per row, 4 tiles of the tiny model's geometry
    expected = F.step_flops(F.shape_from_model_config(tiny()), [seq // 2, seq // 2], 4)
    assert res["flops_per_step"] == pytest.approx(expected)
    assert res["tflops_per_gpu"] == pytest.approx(expected / res["step_time_s"] / 1e12)
    assert res["mfu"] is None and res["peak_memory_gib"] > 0
    assert len(res["losses"]) == 2 and all(4.0 < x < 8.0 for x in res["losses"])  # ~ln(512)
    split = res["split_s"]
    assert split["vit_projector_s"] > 0 and split["lm_fwd_bwd_s"] > 0 and split["optimizer_s"] > 0
    parts = split["vit_projector_s"] + split["lm_fwd_bwd_s"] + split["optimizer_s"] + split["data_wait_s"]
    assert parts <= split["step_s"] * 1.01


def test_hf_reference_same_work(tmp_path):
    pytest.importorskip("transformers")
    lines, hf = _run("benchmarks/hf_reference.py", tmp_path)
    assert lines[-5].startswith("tokens/s: ") and lines[-1].startswith("step split: ")
    seq = hf["seq_length"]
    expected = F.step_flops(F.shape_from_model_config(tiny()), [seq], 4)
    assert hf["flops_per_step"] == pytest.approx(expected)
    assert all(4.0 < x < 8.0 for x in hf["losses"])
    assert hf["split_s"]["vit_projector_s"] > 0
