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
