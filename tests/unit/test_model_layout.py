"""Tensor layouts the HF mapping and the model depend on: fused QKV, pixel shuffle, SDPA packing."""

import pytest
import torch

from megatron_sail.convert.hf_internvl import canonical_key, fuse_qkv, split_qkv
from megatron_sail.models.projector import pixel_shuffle


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (4, 1), (12, 2)])
def test_qkv_fuse_layout_and_round_trip(heads, groups):
    hd, hidden = 3, 5
    q = torch.randn(heads * hd, hidden)
    k, v = torch.randn(groups * hd, hidden), torch.randn(groups * hd, hidden)
    fused = fuse_qkv(q, k, v, heads, groups)
    per = heads // groups
    block = fused.reshape(groups, (per + 2) * hd, hidden)
    # Megatron layout: per KV group [its query heads, its key head, its value head]
    assert torch.equal(block[0, : per * hd], q[: per * hd])
    assert torch.equal(block[-1, per * hd : (per + 1) * hd], k[-hd:])
    assert torch.equal(block[-1, -hd:], v[-hd:])
    for a, b in zip(split_qkv(fused, heads, groups), (q, k, v)):
        assert torch.equal(a, b)
    bias = [torch.randn(x.size(0)) for x in (q, k, v)]
    for a, b in zip(split_qkv(fuse_qkv(*bias, heads, groups), heads, groups), bias):
        assert torch.equal(a, b)


def test_pixel_shuffle_matches_transformers():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    x = torch.randn(3, 16, 8)  # 3 tiles, 4x4 patches, 8 channels
    ref = InternVLModel.pixel_shuffle(None, x.reshape(3, 4, 4, 8), scale_factor=0.5)
    assert torch.equal(pixel_shuffle(x, 0.5), ref.reshape(3, 4, 32))
    with pytest.raises(ValueError, match="square"):
        pixel_shuffle(torch.randn(1, 12, 8), 0.5)


def test_te_names_map_to_local_names():
    assert (
        canonical_key("language_model.decoder.layers.3.self_attention.linear_qkv.layer_norm_weight")
        == "language_model.decoder.layers.3.input_layernorm.weight"
    )
    assert (
        canonical_key("vision_model.encoder.layers.0.mlp.linear_fc1.layer_norm_bias")
        == "vision_model.encoder.layers.0.pre_mlp_layernorm.bias"
    )


def _core(causal: bool):
    """SDPAttention built from a minimal TransformerConfig (no process group needed)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_sail.models.attention import SDPAttention

    cfg = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=4, num_query_groups=2, attention_dropout=0.0
    )
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    return SDPAttention(cfg, 1, mask, "self")


def _reference(q, k, v, causal):
    """Plain softmax attention for one sequence [t, n, d] with GQA by repetition."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    s = torch.einsum("qnd,knd->nqk", q, k) / q.size(-1) ** 0.5
    if causal:
        s = s.masked_fill(torch.ones_like(s[0], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("nqk,knd->qnd", s.softmax(-1), v).reshape(q.size(0), -1)


@pytest.mark.parametrize("bounds", [(0, 5, 6, 13), (0, 4, 8, 12)], ids=["ragged", "equal"])
def test_packed_sdpa_never_crosses_segments(bounds):
    from megatron_sail.models.attention import packed_seq_params

    core = _core(causal=True)
    t = bounds[-1]
    q, k, v = torch.randn(t, 4, 4), torch.randn(t, 2, 4), torch.randn(t, 2, 4)
    psp = packed_seq_params(torch.tensor(bounds, dtype=torch.int32))
    out = core(q, k, v, None, packed_seq_params=psp)
    for a, b in zip(bounds, bounds[1:]):
        torch.testing.assert_close(out[a:b], _reference(q[a:b], k[a:b], v[a:b], True))


def test_sbhd_key_padding_mask_hides_padded_keys():
    core = _core(causal=False)
    q, k, v = torch.randn(6, 2, 4, 4), torch.randn(6, 2, 2, 4), torch.randn(6, 2, 2, 4)
    mask = torch.zeros(1, 1, 1, 6, dtype=torch.bool)
    mask[..., 4:] = True
    out = core(q, k, v, mask)
    for b in range(2):
        want = _reference(q[:, b], k[:4, b], v[:4, b], False)
        torch.testing.assert_close(out[:, b], want)


def test_bad_cu_seqlens_are_rejected():
    from megatron_sail.models.attention import packed_seq_params

    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_seq_params(torch.tensor([0, 5, 5, 9], dtype=torch.int32))
