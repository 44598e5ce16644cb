"""The AIMv2 and SigLIP vision families: parity with transformers' Aimv2VisionModel /
SiglipVisionModel, TP=2+SP equivalence of each whole model (encoder + projector + Qwen2) with one
rank, and the zero-padded odd patch grid (ProjectorConfig.odd_grid='pad')."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import model_cases as mc
import test_model_parallel as mp
from launcher import launch

_HF = {
    "aimv2": ("Aimv2VisionConfig", "Aimv2VisionModel"),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel"),
}
"""transformers classes of each family's encoder."""


def _encoder_parity(name):
    """Our encoder with the weights of a random transformers encoder: output error and what the
    key map left unmatched; then the full model's state for the parallel comparison."""
    import transformers

    from megatron_sail.convert.hf_internvl import apply_key_map
    from megatron_sail.models.families import vision_family

    cfg = mc.variant(name)
    fam = vision_family(cfg.vision.family)
    hf_cfg = {k: v for k, v in fam.hf_config(cfg.vision).items() if k != "model_type"}
    config_cls, model_cls = (getattr(transformers, c) for c in _HF[name])
    hf = model_cls(config_cls(**hf_cfg, attn_implementation="eager")).float().eval()
    mc.randomize_(hf, 5)
    ours = mc.build_ours(cfg)
    mc.randomize_(ours, 6)
    km = fam.key_map(cfg.vision, "vision_model.", "")
    missing, unexpected = ours.load_state_dict(apply_key_map(km, hf.state_dict()), strict=False)
    tiles = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (ours.vision_model(tiles) - hf(pixel_values=tiles).last_hidden_state).abs().max().item()
    full = {k: v.detach().clone() for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    return dict(
        err=err,
        full=full,
        unexpected=unexpected,
        vision_missing=[
            k for k in missing if k.startswith("vision_model.") and not k.endswith("_extra_state")
        ],
        hf_unmapped=sorted(set(hf.state_dict()) - km.hf_names()),
    )


def _odd_grid():
    """A SigLIP model on a 3x3 patch grid (24 px tiles, 8 px patches) with odd_grid='pad':
    its visual tokens, the same projector on features padded by hand, and error mode."""
    from megatron_sail.models.projector import pad_grid, pixel_shuffle

    cfg = mc.variant("siglip")
    cfg = dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, image_size=24),
        projector=dataclasses.replace(cfg.projector, odd_grid="pad"),
    )
    ours = mc.build_ours(cfg)
    mc.randomize_(ours, 7)
    tiles = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = ours.vision_model(tiles)  # [2, 9, 64]
        tokens = ours.visual_tokens(tiles)
        by_hand = torch.zeros(2, 4, 4, feats.size(-1))
        by_hand[:, :3, :3] = feats.reshape(2, 3, 3, -1)
        by_hand = by_hand.reshape(2, 16, -1)
        ours.projector.cfg = dataclasses.replace(cfg.projector, odd_grid="error")
        want = ours.projector(by_hand)
        padded = pad_grid(feats, cfg.projector.merge)
        shuffled = pixel_shuffle(padded, 0.5)
        try:
            ours.projector(feats)
            error = ""
        except ValueError as e:
            error = str(e)
    return dict(
        cfg=cfg,
        feats=feats,
        tokens=tokens,
        want=want,
        by_hand=by_hand,
        padded=padded,
        shuffled=shuffled,
        error=error,
    )


def _reference(rank):
    """One rank: each family's parity with transformers and the single-rank logits/losses/grads
    of its whole model on the parallel test's batches; the odd-grid model."""
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.platform import distributed as D

    out = {}
    for name in _HF:
        D.initialize(ParallelConfig())
        res = _encoder_parity(name)
        res["batches"] = mc.micro_batches(mc.variant(name))
        out[name] = dict(res, **mp._run(rank, name, {}, res["full"], res["batches"]))
    D.initialize(ParallelConfig())
    out["odd_grid"] = _odd_grid()
    return out


def _tp2(rank, refs):
    """One TP=2+SP rank of every family's model, against the single-rank reference."""
    return {
        name: mp._run(rank, name, dict(tp=2, sp=True), dict(r["full"], __grads__=r["grads"]), r["batches"])
        for name, r in refs.items()
    }


@pytest.fixture(scope="module")
def reference():
    """The single-rank results (one spawned process)."""
    return launch(_reference, 1, timeout=600)[0]


@pytest.fixture(scope="module")
def tp2(reference):
    """Every family's TP=2+SP results (one launch of two ranks)."""
    refs = {k: {f: reference[k][f] for f in ("full", "grads", "batches")} for k in _HF}
    return launch(_tp2, 2, refs, timeout=600)


@pytest.mark.parametrize("name", list(_HF))
def test_encoder_matches_transformers(reference, name):
    """AIMv2 (final RMSNorm) and SigLIP (post_layernorm) equal transformers' last_hidden_state;
    every HF weight has a place (no pooling head: use_head / vision_use_head off)."""
    r = reference[name]
    assert r["unexpected"] == [] and r["vision_missing"] == []
    assert r["hf_unmapped"] == []
    assert r["err"] < 1e-4, r["err"]


def test_aimv2_geometry_has_no_class_token_and_refuses_odd_grids():
    from megatron_sail.training.flops import shape_from_model_config

    cfg = mc.variant("aimv2")
    g = cfg.geometry()
    assert (g.class_tokens, g.encoder_tokens, g.tokens_per_tile) == (0, 16, 4)
    s = shape_from_model_config(cfg)
    assert (s.vit_tokens_per_tile, s.vit_class_tokens, s.vit_gated_mlp) == (16, 0, True)
    with pytest.raises(ValueError, match="3x3 patches not divisible by merge 2"):
        cfg.tokens_per_tile(24)  # a 27x27-style odd grid: no silent crop or pad


@pytest.mark.parametrize("name", list(_HF))
def test_tp2_sp_matches_single_rank(reference, tp2, name):
    ref = reference[name]
    results = [r[name] for r in tp2]
    for r in results:
        for got, want in zip(r["logits"], ref["logits"]):
            assert (got - want).abs().max().item() < 1e-4
        for got, want in zip(r["losses"], ref["losses"]):
            assert (got - want).abs().max().item() < 1e-4
        for key, (err, scale) in r["grad_err"].items():
            assert err <= 1e-4 * max(1.0, scale), f"grad {key}: err {err} (scale {scale})"
    vit = [s for r in results for k, (_, s) in r["grad_err"].items() if k.startswith("vision_model.")]
    assert vit and max(vit) > 0, "ViT gradients were all zero"


def test_odd_grid_pad_is_zero_padding_before_the_pixel_shuffle(reference):
    """3x3 grid, merge 2, odd_grid='pad': 4 tokens per tile (ceil(3/2)^2), equal to padding the
    features by hand then the unpadded shuffle; the bottom-right token holds one real patch
    and zeros; geometry, data check and FLOPs count the same 4 tokens."""
    from megatron_sail.data.geometry import geometry_block, mismatch
    from megatron_sail.training.flops import shape_from_model_config

    r = reference["odd_grid"]
    cfg, feats, tokens = r["cfg"], r["feats"], r["tokens"]
    assert feats.shape[:2] == (2, 9)
    assert cfg.tokens_per_tile() == 4 and tokens.shape[0] == 2 * cfg.tokens_per_tile()
    assert (tokens - r["want"]).abs().max().item() == 0.0
    assert torch.equal(r["padded"], r["by_hand"])
    corner = r["shuffled"][:, 3]  # merges patches (2,2),(2,3),(3,2),(3,3): only (2,2) is real
    real = corner != 0
    assert real.sum(-1).tolist() == [feats.size(-1)] * 2
    assert torch.equal(corner[real].reshape(2, -1).sort(-1).values, feats[:, 8].sort(-1).values)
    block = geometry_block(cfg)
    assert (block["grid"], block["tokens_per_tile"], block["odd_grid"]) == (3, 4, "pad")
    assert mismatch("meta.json", {"tile_size": 24, "tokens_per_tile": 4}, cfg) is None
    assert "the model makes 4" in mismatch("meta.json", {"tile_size": 24, "tokens_per_tile": 1}, cfg)
    s = shape_from_model_config(cfg)
    assert (s.tokens_per_tile, s.vit_tokens_per_tile) == (4, 9)


def test_odd_grid_error_mode_still_refuses(reference):
    assert "patch grid 3x3 is not divisible by 1/0.5" in reference["odd_grid"]["error"]
    cfg = reference["odd_grid"]["cfg"]
    err = dataclasses.replace(cfg, projector=dataclasses.replace(cfg.projector, odd_grid="error"))
    with pytest.raises(ValueError, match="3x3 patches not divisible by merge 2"):
        err.tokens_per_tile()
