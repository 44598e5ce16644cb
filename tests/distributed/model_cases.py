"""Shared builders for the model tests: tiny configs, random HF models, packed inputs.

Everything runs inside ranks spawned by ``launcher.launch`` (the CPU backend patches torch
process-wide, so model code never runs in the pytest process itself).
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_sail.config.model import ModelConfig, tiny


def variant(name: str) -> ModelConfig:
    """Named tiny configs covering the shapes the parity tests need."""
    cfg = tiny(vocab_size=256)
    if name == "base":  # GQA 4/2, tied, LayerNorm ViT
        return cfg
    if name == "mha_untied_rms":  # no GQA, untied, RMSNorm ViT with QK-norm, feature layer -2
        return dataclasses.replace(
            cfg,
            vision=dataclasses.replace(
                cfg.vision, norm_type="rms_norm", qk_norm=True, num_layers=3, select_layer=-2
            ),
            language=dataclasses.replace(cfg.language, num_kv_heads=4, tie_embeddings=False),
        )
    if name == "mqa":  # 4 heads / 1 KV head, untied, no qkv bias in the ViT
        return dataclasses.replace(
            cfg,
            vision=dataclasses.replace(cfg.vision, qkv_bias=False),
            language=dataclasses.replace(cfg.language, num_kv_heads=1, tie_embeddings=False),
        )
    if name == "qwen3":  # Qwen3 LM: per-head QK-norm, no qkv bias, head_dim 48 != 128 / 4, untied
        return dataclasses.replace(
            cfg,
            language=dataclasses.replace(
                cfg.language, family="qwen3", qkv_bias=False, kv_channels=48, tie_embeddings=False
            ),
        )
    if name == "qwen3_moe":  # Qwen3-MoE LM: 4 experts of width 64, top-2, renormalized, untied
        return dataclasses.replace(
            cfg,
            language=dataclasses.replace(
                cfg.language,
                family="qwen3_moe",
                qkv_bias=False,
                kv_channels=48,
                tie_embeddings=False,
                num_experts=4,
                moe_ffn_hidden_size=64,
                moe_router_topk=2,
            ),
        )
    if name == "aimv2":  # AIMv2 encoder: RMSNorm, SwiGLU, no bias, no class token
        return dataclasses.replace(
            cfg,
            vision=dataclasses.replace(
                cfg.vision,
                family="aimv2",
                norm_type="rms_norm",
                norm_eps=1e-5,
                qkv_bias=False,
                ffn_hidden_size=96,
            ),
        )
    if name == "siglip":  # SigLIP encoder: LayerNorm, GELU-tanh, biases, no class token
        return dataclasses.replace(
            cfg, vision=dataclasses.replace(cfg.vision, family="siglip", ffn_hidden_size=96)
        )
    raise KeyError(name)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter with N(0, 0.2) noise (HF's init zeroes cls/pos embeddings)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def hf_model(cfg: ModelConfig, seed: int = 0):
    """transformers InternVLForConditionalGeneration with random weights, fp32, eval mode."""
    from transformers import InternVLForConditionalGeneration

    from megatron_sail.convert.hf_internvl import to_hf_config

    hf_cfg = to_hf_config(cfg)
    hf_cfg._attn_implementation = "eager"
    hf_cfg.text_config._attn_implementation = "eager"
    hf_cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(hf_cfg).float().eval()
    randomize_(model, seed)
    if cfg.language.tie_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    return model


def sample(cfg: ModelConfig, text_lens: list[int], tiles_per_image: list[int], tile: int, seed: int):
    """One sample: text runs with image blocks between them. Returns (ids [L], tiles [T,3,t,t])."""
    g = torch.Generator().manual_seed(seed)
    per_tile = cfg.tokens_per_tile(tile)
    parts = []
    for i, n in enumerate(text_lens):
        parts.append(torch.randint(0, cfg.img_context_token_id, (n,), generator=g))
        if i < len(tiles_per_image):
            parts.append(torch.full((per_tile * tiles_per_image[i],), cfg.img_context_token_id))
    tiles = torch.randn(sum(tiles_per_image), 3, tile, tile, generator=g)
    return torch.cat(parts), tiles


def pack(samples, length: int | None = None):
    """Pack samples into one row: ids [1, S], tiles [T,...], cu_seqlens (pad = own segment)."""
    ids = torch.cat([s[0] for s in samples])
    cu = [0]
    for s in samples:
        cu.append(cu[-1] + len(s[0]))
    if length is not None and length > len(ids):
        pad = length - len(ids)
        ids = torch.cat([ids, torch.zeros(pad, dtype=ids.dtype)])
        cu.append(length)
    tiles = torch.cat([s[1] for s in samples]) if samples else torch.zeros(0, 3, 1, 1)
    return ids[None], tiles, torch.tensor(cu, dtype=torch.int32)


def build_ours(cfg: ModelConfig, parallel=None, pre_process=True, post_process=True, vp_stage=None):
    """Our model for the current rank, on the CPU, fp32 local spec."""
    from megatron_sail.models.sail_vl import SailVLModel

    return SailVLModel(
        cfg, parallel, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage, use_te=False
    )


def batch(rows, seq_len: int):
    """Stack packed rows into one micro-batch dict; cu_seqlens flattened over the batch."""
    ids, tiles, cus = [], [], []
    for r, samples in enumerate(rows):
        i, t, cu = pack(samples, seq_len)
        ids.append(i), tiles.append(t)
        cus.append(cu[(1 if r else 0) :] + r * seq_len)
    ids = torch.cat(ids)
    g = torch.Generator().manual_seed(int(ids.sum()))
    return {
        "input_ids": ids,
        "tiles": torch.cat([t for t in tiles if t.numel()] or [torch.zeros(0, 3, 32, 32)]),
        "cu_seqlens": torch.cat(cus).to(torch.int32),
        "labels": torch.randint(0, 200, ids.shape, generator=g),
    }


def micro_batches(cfg: ModelConfig):
    """Two micro-batches (B=2, S=32): packed samples, multi-image, multi-tile, text-only rows,
    padding segments; tiles of the trained size (32) in the first, 48 px (interpolated) in the second."""
    s = lambda texts, imgs, tile, seed: sample(cfg, texts, imgs, tile, seed)  # noqa: E731
    mb0 = batch([[s([3, 4], [1], 32, 1), s([5], [], 32, 2)], [s([2, 3, 2], [2, 1], 32, 3)]], 32)
    mb1 = batch([[s([4, 5], [2], 48, 4)], [s([10], [], 48, 5), s([3, 4], [1], 48, 6)]], 32)
    return [mb0, mb1]
