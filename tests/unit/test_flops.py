"""FLOPs counting checked against numbers worked out by hand."""

import dataclasses
import math

import numpy as np
import pytest

from megatron_sail.training import flops as F

# A small model whose FLOPs are easy to add up by hand.
SMALL = F.FlopsShape(
    vit_hidden=8,
    vit_layers=2,
    vit_ffn=16,
    vit_tokens_per_tile=5,
    patch_dim=12,
    tokens_per_tile=1,
    projector_in=32,
    lm_hidden=16,
    lm_layers=3,
    lm_heads=4,
    lm_kv_heads=2,
    lm_head_dim=4,
    lm_ffn=24,
    vocab_size=50,
)

SAIL_2B = F.FlopsShape(
    vit_hidden=1024,
    vit_layers=24,
    vit_ffn=4096,
    vit_tokens_per_tile=1025,
    patch_dim=3 * 14 * 14,
    tokens_per_tile=256,
    projector_in=4096,
    lm_hidden=1536,
    lm_layers=28,
    lm_heads=12,
    lm_kv_heads=2,
    lm_head_dim=128,
    lm_ffn=8960,
    vocab_size=151936,
)


def test_vit_by_hand():
    # per tile: conv 2*4 patches*12*8 = 768; per layer: tokens 5 * 2*(4*64 + 2*8*16) = 5*1024 = 5120,
    # attention 4*8*25 = 800 -> 2 layers * 5920 = 11840; total 12608 per tile
    assert F.vit_forward_flops(SMALL, 1) == 12608
    assert F.vit_forward_flops(SMALL, 3) == 3 * 12608


def test_projector_by_hand():
    # 2 * (32*16 + 16*16) = 1536 per visual token, 1 token per tile
    assert F.projector_forward_flops(SMALL, 2) == 2 * 1536


def test_lm_by_hand():
    # per token per layer: qkv 16*(16+2*8)=512, o 16*16=256, mlp 3*16*24=1152 -> 2*1920=3840
    # head: 2*16*50 = 1600; one sample of 3 tokens: 6 causal pairs, attention 4*16*6 = 384 per layer
    expected = 3 * (3 * 3840 + 1600) + 3 * 384
    assert F.lm_forward_flops(SMALL, [3]) == expected


def test_moe_lm_by_hand():
    # 4 experts of width 12, top-2: the active SwiGLU is 2 x 12 = 24 wide (lm_ffn), plus the
    # router 16 x 4 = 64 -> per token per layer 2*(512 + 256 + 3*16*24 + 64) = 3968
    moe = dataclasses.replace(SMALL, lm_ffn=2 * 12, lm_experts=4)
    expected = 3 * (3 * 3968 + 1600) + 3 * 384
    assert F.lm_forward_flops(moe, [3]) == expected
    assert F.step_flops(moe, [3], 0) == 3 * expected


def test_step_is_three_forwards():
    fwd = (
        F.vit_forward_flops(SMALL, 2)
        + F.projector_forward_flops(SMALL, 2)
        + F.lm_forward_flops(SMALL, [7, 5])
    )
    assert F.step_flops(SMALL, [7, 5], 2) == 3 * fwd


def test_packed_attention_is_per_subsequence():
    """Four 1024-token samples cost a quarter of the attention of one 4096-token sample."""
    one = F.lm_forward_flops(SAIL_2B, [4096]) - F.lm_forward_flops(SAIL_2B, [0])
    four = F.lm_forward_flops(SAIL_2B, [1024] * 4) - F.lm_forward_flops(SAIL_2B, [0])
    linear_per_token = F.lm_forward_flops(SAIL_2B, [1]) - 4 * 128 * 12 * 28  # minus one pair
    att_one = one - 4096 * linear_per_token
    att_four = four - 4096 * linear_per_token
    assert att_one == 4 * 1536 * 28 * (4096 * 4097 // 2)
    assert att_four == 4 * 1536 * 28 * 4 * (1024 * 1025 // 2)
    assert att_four / att_one == pytest.approx(0.25, rel=1e-3)


def test_matches_issue_6_hf_measurement():
    """Issue 6: HF InternVL, 2B shape, 4096 tokens, 4 tiles, 0.172 s/step is about 296 TFLOP/s."""
    tflops = F.step_flops(SAIL_2B, [4096], 4) / 0.172 / 1e12
    assert tflops == pytest.approx(296, abs=2)


def test_real_seqlens_drops_padding():
    assert F.real_seqlens(np.array([0, 3, 7, 10], dtype=np.int32), 2) == [3, 4]
    assert F.real_seqlens([0, 10], 1) == [10]
    with pytest.raises(ValueError, match="num_samples"):
        F.real_seqlens([0, 3, 10], 3)
    with pytest.raises(ValueError, match="cu_seqlens"):
        F.real_seqlens([1, 3], 1)


def test_peak_table_and_mfu():
    assert F.peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert F.peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert F.peak_flops_for_name("NVIDIA H200") == 989e12
    assert F.peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert F.peak_flops_for_name("NVIDIA A10") == 125e12
    assert F.peak_flops_for_name("Some CPU") is None
    assert F.mfu(494.5e12, 989e12) == pytest.approx(0.5)
    assert math.isnan(F.mfu(1e12, None))


def test_cpu_has_no_peak():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert F.device_peak_flops() is None


def test_shape_from_model_config():
    model_cfg = pytest.importorskip("megatron_sail.config.model")
    s = F.shape_from_model_config(model_cfg.sail_2b())
    assert s == SAIL_2B
    tiny = F.shape_from_model_config(model_cfg.tiny())
    assert tiny.vit_tokens_per_tile == (32 // 8) ** 2 + 1 and tiny.tokens_per_tile == 4
    assert tiny.projector_in == 4 * 64
