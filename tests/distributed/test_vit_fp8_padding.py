"""--fp8-vit: the ViT's token axis is padded (masked) so that each rank's FP8 GEMMs see a
multiple of 16 tokens per tile, whatever the tile count (a 448 px tile has 1,025 tokens, and a
text-only micro-batch runs one blank tile); padding leaves the features unchanged. Without TE
(CPU) Megatron's FP8 context is a no-op, so the padding itself is what runs here."""

from __future__ import annotations

import pytest
import torch

import model_cases as mc
from launcher import launch


def test_token_padding_and_width_checks():
    from megatron_sail.config.model import VisionConfig
    from megatron_sail.models.vit import token_padding
    from megatron_sail.training.precision import _check_fp8_vit

    assert token_padding(1025, 1, True) == 15 and token_padding(1025, 1, False) == 0
    assert token_padding(1025, 2, False) == 1 and token_padding(1025, 2, True) == 31
    assert token_padding(1024, 4, True) == 0
    _check_fp8_vit(VisionConfig(), tp=4)  # InternViT-300M: 1024 / 4096 / 3072 all aligned
    with pytest.raises(SystemExit, match="MLP size / TP 120"):
        _check_fp8_vit(VisionConfig(hidden_size=64, num_heads=4, ffn_hidden_size=240), tp=2)


def _run(rank):
    """TP=2+SP: ViT features with and without FP8 padding, and the per-rank token counts the
    encoder received."""
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.platform import distributed as D

    parallel = ParallelConfig(tp=2, sp=True)
    D.initialize(parallel)
    model = mc.build_ours(mc.variant("mha_untied_rms"), parallel).eval()
    seen = []
    model.vision_model.encoder.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(
            tuple(kwargs.get("hidden_states", args[0] if args else None).shape)
        ),
        with_kwargs=True,
    )
    tiles = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    out = {}
    for fp8 in (None, "hybrid"):
        model.vision_model.config.fp8 = fp8
        with torch.no_grad():
            out[fp8] = model.vision_model(tiles)
    return out[None], out["hybrid"], seen


def test_fp8_padding_keeps_vit_features():
    for plain, padded, seen in launch(_run, 2, timeout=300):
        # 17 tokens (16 patches + class) -> 18 (split over 2) without FP8, 32 (16 per rank) with.
        assert [s[0] for s in seen] == [9, 16]
        assert plain.shape == padded.shape == (1, 16, 64)
        assert (plain - padded).abs().max().item() < 1e-5
