"""Model-family specs: registry, backwards-compatible configs, Qwen3 config/FLOPs/key map."""
import dataclasses

import pytest

from megatron_sail.config.model import LanguageConfig, ModelConfig, VisionConfig, tiny
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.config.run import apply_overrides
from megatron_sail.convert.hf_internvl import from_hf_config, key_map, to_hf_config
from megatron_sail.models import families
from megatron_sail.training import flops as F


def _qwen3(cfg: ModelConfig, **kw) -> ModelConfig:
    """``cfg`` with a Qwen3 LM (head_dim 48 != 128 / 4 heads, no qkv bias)."""
    lm = dataclasses.replace(cfg.language, family="qwen3", qkv_bias=False, kv_channels=48, **kw)
    return dataclasses.replace(cfg, language=lm)


def test_unknown_families_fail_where_the_config_is_made():
    with pytest.raises(ValueError, match="unknown language family 'llama'.*qwen2"):
        LanguageConfig(family="llama")
    with pytest.raises(ValueError, match="unknown vision family 'clip'.*internvit"):
        VisionConfig(family="clip")


def test_a_model_config_without_family_fields_means_internvit_and_qwen2():
    """model_config.yaml files written before families existed load unchanged."""
    old = dataclasses.asdict(tiny())
    del old["vision"]["family"], old["language"]["family"], old["language"]["kv_channels"]
    cfg = ModelConfig()
    apply_overrides(cfg, old, "old.yaml")
    assert cfg == tiny()
    assert (cfg.vision.family, cfg.language.family) == ("internvit", "qwen2")
    assert cfg.language.head_dim == 32


def test_geometry_comes_from_the_vision_family():
    g = tiny().geometry(48)
    assert (g.grid, g.class_tokens, g.merge, g.encoder_tokens, g.tokens_per_tile) == (6, 1, 2, 37, 9)
    with pytest.raises(ValueError, match="not divisible by merge"):
        tiny().geometry(40).tokens_per_tile


def test_qwen3_transformer_config_has_qk_norm_free_head_dim_and_no_qkv_bias():
    lm = _qwen3(tiny()).language
    tc = families.language_family("qwen3").transformer_config(lm, ParallelConfig())
    assert tc.qk_layernorm and not tc.add_qkv_bias and tc.kv_channels == 48
    q2 = families.language_family("qwen2").transformer_config(tiny().language, ParallelConfig())
    assert not q2.qk_layernorm and q2.add_qkv_bias and q2.kv_channels == 32


def test_qwen3_hf_config_round_trip_and_key_map():
    cfg = _qwen3(tiny(), tie_embeddings=False)
    hf = to_hf_config(cfg)
    assert hf.text_config.model_type == "qwen3" and hf.text_config.head_dim == 48
    assert hf.text_config.attention_bias is False
    assert from_hf_config(hf) == cfg
    names = key_map(cfg).hf_names()
    assert "model.language_model.layers.1.self_attn.q_norm.weight" in names
    assert "model.language_model.layers.0.self_attn.q_proj.bias" not in names
    assert "model.language_model.layers.0.self_attn.q_proj.bias" in key_map(tiny()).hf_names()
    with pytest.raises(ValueError, match="no separate head_dim"):  # qwen2 cannot express it
        to_hf_config(dataclasses.replace(cfg, language=dataclasses.replace(
            cfg.language, family="qwen2")))


def test_flops_use_the_family_head_dim():
    """Qwen3's q/k/v/o widths are heads x head_dim (48), not the hidden size (128)."""
    base, q3 = F.shape_from_model_config(tiny()), F.shape_from_model_config(_qwen3(tiny()))
    assert (base.lm_head_dim, q3.lm_head_dim) == (32, 48)
    h, layers, heads, kv = 128, 2, 4, 2
    attn_delta = 2 * (h * (heads + 2 * kv) + heads * h) * (48 - 32) * layers  # per token
    pairs = 10 * 11 // 2
    want = 10 * attn_delta + layers * 4 * heads * (48 - 32) * pairs
    assert F.lm_forward_flops(q3, [10]) - F.lm_forward_flops(base, [10]) == want
    assert base.vit_class_tokens == 1 and base.vit_tokens_per_tile == 17


def test_aimv2_family_config_round_trip_and_container_refusal():
    from transformers import Aimv2VisionConfig

    fam = families.vision_family("aimv2")
    v = dataclasses.replace(tiny().vision, family="aimv2", norm_type="rms_norm", norm_eps=1e-5,
                            qkv_bias=False, ffn_hidden_size=96)
    hf = Aimv2VisionConfig(**{k: x for k, x in fam.hf_config(v).items() if k != "model_type"})
    assert fam.from_hf_config(hf, select_layer=-1) == dataclasses.replace(v, layer_scale_init=0.1)
    with pytest.raises(ValueError, match="is_native"):
        fam.from_hf_config(Aimv2VisionConfig(is_native=True), select_layer=-1)
    with pytest.raises(ValueError, match="cannot hold a 'aimv2' vision tower"):
        to_hf_config(dataclasses.replace(tiny(), vision=v))
    km = fam.key_map(dataclasses.replace(v, num_layers=3, select_layer=-2), "vision_model.", "")
    assert "rms_norm.weight" not in km.hf_names()  # the final norm feeds only the last layer
    assert fam.unused_hf(dataclasses.replace(v, num_layers=3, select_layer=-2), "", "rms_norm.weight")


def _qwen3_moe(cfg: ModelConfig, **kw) -> ModelConfig:
    """``cfg`` with a Qwen3-MoE LM: 4 experts of width 64, top-2."""
    lm = dataclasses.replace(_qwen3(cfg).language, family="qwen3_moe", tie_embeddings=False,
                             num_experts=4, moe_ffn_hidden_size=64, moe_router_topk=2, **kw)
    return dataclasses.replace(cfg, language=lm)


@pytest.mark.parametrize("norm", [True, False], ids=["renormalized", "plain_topk"])
def test_qwen3_moe_routing_maps_to_megatron_and_hf_config_round_trips(norm):
    """norm_topk_prob (softmax, top-k, renormalize) is Megatron's top-k then softmax over the k
    (pre_softmax False); without it, softmax over all experts then top-k (pre_softmax True)."""
    cfg = _qwen3_moe(tiny(), moe_norm_topk_prob=norm)
    tc = families.language_family("qwen3_moe").transformer_config(cfg.language, ParallelConfig())
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (4, 2, 64)
    assert tc.moe_router_pre_softmax is (not norm) and tc.qk_layernorm
    hf = to_hf_config(cfg)
    t = hf.text_config
    assert (t.model_type, t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size,
            t.norm_topk_prob) == ("qwen3_moe", 4, 2, 64, norm)
    assert from_hf_config(hf) == cfg
    t.mlp_only_layers = [1]
    with pytest.raises(ValueError, match="dense layers"):
        from_hf_config(hf)


def test_qwen3_moe_key_map_names_every_expert_as_save_pretrained_does():
    import torch

    from megatron_sail.convert.hf_internvl import from_transformers_params, to_transformers_params

    cfg = _qwen3_moe(tiny())
    km = key_map(cfg)
    names = km.hf_names()
    pre = "model.language_model.layers.1.mlp."
    assert {pre + "gate.weight", pre + "experts.3.gate_proj.weight",
            pre + "experts.3.up_proj.weight", pre + "experts.3.down_proj.weight"} <= names
    assert pre + "gate_proj.weight" not in names  # no dense MLP left
    assert ("language_model.decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight",
            (pre + "experts.3.gate_proj.weight", pre + "experts.3.up_proj.weight")) in km.concat
    # transformers' fused in-memory experts: [gate; up] per expert, stacked in expert order
    g = torch.Generator().manual_seed(0)
    fused = {pre + "experts.gate_up_proj": torch.randn(4, 128, 128, generator=g),
             pre + "experts.down_proj": torch.randn(4, 128, 64, generator=g)}
    other = "model.language_model.layers.0.mlp.experts."
    fused.update({other + "gate_up_proj": torch.zeros(4, 128, 128), other + "down_proj": torch.zeros(4, 128, 64)})
    split = from_transformers_params(fused, cfg)
    assert torch.equal(split[pre + "experts.2.gate_proj.weight"], fused[pre + "experts.gate_up_proj"][2, :64])
    assert torch.equal(split[pre + "experts.2.up_proj.weight"], fused[pre + "experts.gate_up_proj"][2, 64:])
    assert torch.equal(split[pre + "experts.1.down_proj.weight"], fused[pre + "experts.down_proj"][1])
    back = to_transformers_params(split, cfg)
    assert set(back) == set(fused) and all(torch.equal(back[k], v) for k, v in fused.items())
    del split[pre + "experts.3.up_proj.weight"]
    with pytest.raises(KeyError, match="experts.3.up_proj.weight"):
        to_transformers_params(split, cfg)


def test_qwen3_moe_flops_count_the_active_experts_and_the_router():
    """Per token and layer the MoE runs top-k experts (k x expert width of SwiGLU) plus the
    router (hidden x experts), i.e. a dense Qwen3 of width k x 64 plus 2 x hidden x experts."""
    moe = F.shape_from_model_config(_qwen3_moe(tiny()))
    dense = F.shape_from_model_config(_qwen3(tiny(), ffn_hidden_size=2 * 64, tie_embeddings=False))
    assert (moe.lm_ffn, moe.lm_experts, dense.lm_experts) == (128, 4, 0)
    h, layers, tokens = 128, 2, 10
    assert F.lm_forward_flops(moe, [tokens]) - F.lm_forward_flops(dense, [tokens]) == \
        tokens * layers * 2 * h * 4
