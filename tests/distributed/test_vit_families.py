"""The AIMv2 vision family: parity with transformers' Aimv2VisionModel, and TP=2+SP equivalence
of the whole model (AIMv2 + projector + Qwen2) with one rank."""
from __future__ import annotations

import pytest
import torch

import model_cases as mc
import test_model_parallel as mp
from launcher import launch


def _reference(rank):
    """One rank: AIMv2 weights from a random transformers model, parity of the encoder output,
    then the single-rank logits/losses/grads of the whole model on the parallel test's batches."""
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert.hf_internvl import apply_key_map
    from megatron_sail.models.families import vision_family
    from megatron_sail.platform import distributed as D

    D.initialize(ParallelConfig())
    cfg = mc.variant("aimv2")
    fam = vision_family("aimv2")
    hf_cfg = {k: v for k, v in fam.hf_config(cfg.vision).items() if k != "model_type"}
    hf = Aimv2VisionModel(Aimv2VisionConfig(**hf_cfg, attn_implementation="eager")).float().eval()
    mc.randomize_(hf, 5)
    ours = mc.build_ours(cfg)
    mc.randomize_(ours, 6)
    km = fam.key_map(cfg.vision, "vision_model.", "")
    missing, unexpected = ours.load_state_dict(apply_key_map(km, hf.state_dict()), strict=False)
    tiles = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (ours.vision_model(tiles) - hf(pixel_values=tiles).last_hidden_state).abs().max().item()
    full = {k: v.detach().clone() for k, v in ours.state_dict().items()
            if not k.endswith("_extra_state")}
    batches = mc.micro_batches(cfg)
    res = mp._run(rank, "aimv2", {}, full, batches)
    return dict(res, err=err, full=full, batches=batches, unexpected=unexpected,
                vision_missing=[k for k in missing if k.startswith("vision_model.")
                                and not k.endswith("_extra_state")],
                hf_unmapped=sorted(set(hf.state_dict()) - km.hf_names()))


@pytest.fixture(scope="module")
def reference():
    """The single-rank results (one spawned process)."""
    return launch(_reference, 1, timeout=600)[0]


def test_aimv2_encoder_matches_transformers(reference):
    assert reference["unexpected"] == [] and reference["vision_missing"] == []
    assert reference["hf_unmapped"] == []  # every HF weight has a place (no head: use_head off)
    assert reference["err"] < 1e-4, reference["err"]


def test_aimv2_geometry_has_no_class_token_and_refuses_odd_grids():
    from megatron_sail.training.flops import shape_from_model_config

    cfg = mc.variant("aimv2")
    g = cfg.geometry()
    assert (g.class_tokens, g.encoder_tokens, g.tokens_per_tile) == (0, 16, 4)
    s = shape_from_model_config(cfg)
    assert (s.vit_tokens_per_tile, s.vit_class_tokens, s.vit_gated_mlp) == (16, 0, True)
    with pytest.raises(ValueError, match="3x3 patches not divisible by merge 2"):
        cfg.tokens_per_tile(24)  # a 27x27-style odd grid: no silent crop or pad


def test_aimv2_tp2_sp_matches_single_rank(reference):
    full = dict(reference["full"], __grads__=reference["grads"])
    results = launch(mp._run, 2, "aimv2", dict(tp=2, sp=True), full, reference["batches"],
                     timeout=600)
    for r in results:
        for got, want in zip(r["logits"], reference["logits"]):
            assert (got - want).abs().max().item() < 1e-4
        for got, want in zip(r["losses"], reference["losses"]):
            assert (got - want).abs().max().item() < 1e-4
        for key, (err, scale) in r["grad_err"].items():
            assert err <= 1e-4 * max(1.0, scale), f"grad {key}: err {err} (scale {scale})"
    vit = [s for r in results for k, (_, s) in r["grad_err"].items() if k.startswith("vision_model.")]
    assert vit and max(vit) > 0, "ViT gradients were all zero"
