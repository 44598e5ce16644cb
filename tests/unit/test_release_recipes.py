"""Recipes of the released SAIL-VL-1.5 / SAIL-VL2 shapes: the confirmed config numbers, and
parameter counts equal to the published sizes.

Counts come from transformers' own modules built on the meta device (no memory) from the
families' HF configs - the same configs conversion writes, so a wrong recipe field or a wrong
family mapping changes the count. Published numbers (sources in docs/architecture.md):
* SAIL-VL2-2B model.safetensors.index.json total_size 5,461,130,240 bytes of bf16 (it stores the
  tied lm_head once more) = 2,730,565,120 tensor elements;
* AIMv2-Huge-448 (apple/aimv2-huge-patch14-448, no head): 682,031,616 parameters;
* Qwen model cards: Qwen2.5-1.5B 1.54B (1.31B non-embedding), Qwen2.5-7B 7.61B (6.53B),
  Qwen3-1.7B 1.7B (1.4B),
  Qwen3-8B 8.2B (6.95B), Qwen3-30B-A3B 30.5B total / 3.3B activated.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sail.config import model as M
from megatron_sail.config import recipes
from megatron_sail.models.families import language_family, vision_family

RELEASES = ("sail_vl15_2b", "sail_vl16_8b", "sail_vl2_2b", "sail_vl2_8b", "sail_vl2_30b_a3b")


def _meta_numel(module) -> int:
    """Parameters of a module (tied tensors once, as transformers counts them)."""
    return sum(p.numel() for p in module.parameters())


def _vision_params(cfg) -> int:
    """transformers' Aimv2VisionModel of the recipe's encoder."""
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    hf = {
        k: v for k, v in vision_family(cfg.vision.family).hf_config(cfg.vision).items() if k != "model_type"
    }
    with torch.device("meta"):
        return _meta_numel(Aimv2VisionModel(Aimv2VisionConfig(**hf)))


def _lm_params(cfg) -> tuple[int, int]:
    """(total, embedding) of transformers' causal LM of the recipe's decoder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(language_family(cfg.language.family).hf_config(cfg.language))
    conf = AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        return _meta_numel(AutoModelForCausalLM.from_config(conf)), conf.vocab_size * conf.hidden_size


def _projector_params(cfg) -> int:
    """LayerNorm(4 d_vit) -> Linear(4 d_vit, d_lm) -> GELU -> Linear(d_lm, d_lm), with biases."""
    d_in, d = cfg.vision.hidden_size * cfg.projector.merge**2, cfg.language.hidden_size
    return 2 * d_in + d_in * d + d + d * d + d


def test_release_recipes_are_listed_and_build_their_run_configs():
    for name in RELEASES:
        run = recipes.get_recipe(name)()
        assert run.recipe == name and run.model == getattr(M, name)()
        assert run.model.tokens_per_tile() == 256  # 32x32 patches at 448 px, 2x2 merge, no class token
        assert run.model.geometry().class_tokens == 0
        p, lm, v = run.parallel, run.model.language, run.model.vision
        assert v.num_heads % p.tp == 0 and lm.num_kv_heads % p.tp == 0 and lm.num_layers % p.pp == 0
        assert (lm.num_experts or p.ep) % p.ep == 0
    assert recipes.get_recipe("sail_vl2_30b_a3b")().parallel.ep == 8
    from megatron_sail.config.run import resolve

    for name in RELEASES:  # the trainer's command line resolves them (derived fields, checks)
        assert resolve(["--recipe", name, "--stage", "sft-knowledge"]).model == getattr(M, name)()


def test_release_shapes_are_the_confirmed_config_numbers():
    """The numbers of docs/architecture.md's table (SAIL-VL2-2B config.json, AIMv2-Huge,
    Qwen3-8B / Qwen3-30B-A3B configs)."""
    for name in RELEASES:
        v = getattr(M, name)().vision
        assert (
            v.family,
            v.hidden_size,
            v.num_layers,
            v.num_heads,
            v.ffn_hidden_size,
            v.patch_size,
            v.image_size,
            v.norm_type,
            v.norm_eps,
            v.qkv_bias,
            v.select_layer,
        ) == ("aimv2", 1536, 24, 12, 4096, 14, 448, "rms_norm", 1e-5, False, -1)
    shape = lambda lm: (  # noqa: E731
        lm.family,
        lm.hidden_size,
        lm.num_layers,
        lm.num_heads,
        lm.num_kv_heads,
        lm.head_dim,
        lm.ffn_hidden_size,
        lm.vocab_size,
        lm.rope_theta,
        lm.tie_embeddings,
        lm.qkv_bias,
    )
    assert shape(M.sail_vl15_2b().language) == shape(M.sail_2b().language)  # Qwen2.5-1.5B
    assert shape(M.sail_vl16_8b().language) == shape(M.sail_8b().language)  # Qwen2.5-7B
    assert shape(M.sail_vl2_2b().language) == ("qwen3", 2048, 28, 16, 8, 128, 6144, 151936, 1e6, True, False)
    assert shape(M.sail_vl2_8b().language) == (
        "qwen3",
        4096,
        36,
        32,
        8,
        128,
        12288,
        151936,
        1e6,
        False,
        False,
    )
    moe = M.sail_vl2_30b_a3b().language
    assert shape(moe)[:6] == ("qwen3_moe", 2048, 48, 32, 4, 128) and not moe.tie_embeddings
    assert (moe.num_experts, moe.moe_ffn_hidden_size, moe.moe_router_topk, moe.moe_norm_topk_prob) == (
        128,
        768,
        8,
        True,
    )
    assert M.sail_vl2_2b().img_context_token_id == 151671  # SAIL-VL2's generate() id


def test_sail_vl2_2b_has_exactly_the_published_tensor_count():
    """Vision + projector + Qwen3-1.7B (+ the tied head the hub file stores again) equals the
    hub index's total_size / 2 bytes per bf16 element, to the element."""
    cfg = M.sail_vl2_2b()
    vision, (lm, emb) = _vision_params(cfg), _lm_params(cfg)
    assert vision == 682_031_616  # AIMv2-Huge-448 without head
    assert vision + _projector_params(cfg) + lm + emb == 5_461_130_240 // 2
    assert round(lm / 1e9, 1) == 1.7 and round((lm - emb) / 1e9, 1) == 1.4


@pytest.mark.parametrize(
    "name,total,non_embedding",
    [("sail_vl15_2b", 1.54, 1.31), ("sail_vl16_8b", 7.61, 6.53), ("sail_vl2_8b", 8.2, 6.95)],
)
def test_dense_language_models_have_their_published_sizes(name, total, non_embedding):
    cfg = getattr(M, name)()
    lm, emb = _lm_params(cfg)
    head = 0 if cfg.language.tie_embeddings else emb
    for got, card in ((lm, total), (lm - emb - head, non_embedding)):
        unit = 10.0 ** -len(str(card).split(".")[1])  # within one unit of the card's last digit
        assert abs(got / 1e9 - card) < unit, (got, card)  # (cards round or truncate: 7.6156B "7.61B")
    assert _vision_params(cfg) == 682_031_616
    vlm = (lm + _vision_params(cfg) + _projector_params(cfg)) / 1e9
    assert {"sail_vl15_2b": 2.2, "sail_vl16_8b": 8.3, "sail_vl2_8b": 8.9}[name] == round(vlm, 1)


def test_moe_language_model_has_its_published_total_and_active_sizes():
    """Qwen3-30B-A3B: 30.5B parameters, 3.3B of them active per token (top-8 of 128 experts)."""
    cfg = M.sail_vl2_30b_a3b()
    lm, _ = _lm_params(cfg)
    t = cfg.language
    expert = 3 * t.hidden_size * t.moe_ffn_hidden_size
    active = lm - (t.num_experts - t.moe_router_topk) * expert * t.num_layers
    assert round(lm / 1e9, 1) == 30.5
    assert 3.3 <= active / 1e9 < 3.4  # 3.35B incl. embedding and head; the card writes "3.3B"
