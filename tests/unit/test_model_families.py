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
        tiny().geometry(40).tokens_per_tile  # noqa: B018 - reading the property raises


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
        to_hf_config(dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, family="qwen2")))


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
    v = dataclasses.replace(
        tiny().vision, family="aimv2", norm_type="rms_norm", norm_eps=1e-5, qkv_bias=False, ffn_hidden_size=96
    )
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
    lm = dataclasses.replace(
        _qwen3(cfg).language,
        family="qwen3_moe",
        tie_embeddings=False,
        num_experts=4,
        moe_ffn_hidden_size=64,
        moe_router_topk=2,
        **kw,
    )
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
    assert (
        t.model_type,
        t.num_experts,
        t.num_experts_per_tok,
        t.moe_intermediate_size,
        t.norm_topk_prob,
    ) == ("qwen3_moe", 4, 2, 64, norm)
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
    assert {
        pre + "gate.weight",
        pre + "experts.3.gate_proj.weight",
        pre + "experts.3.up_proj.weight",
        pre + "experts.3.down_proj.weight",
    } <= names
    assert pre + "gate_proj.weight" not in names  # no dense MLP left
    assert (
        "language_model.decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight",
        (pre + "experts.3.gate_proj.weight", pre + "experts.3.up_proj.weight"),
    ) in km.concat
    # transformers' fused in-memory experts: [gate; up] per expert, stacked in expert order
    g = torch.Generator().manual_seed(0)
    fused = {
        pre + "experts.gate_up_proj": torch.randn(4, 128, 128, generator=g),
        pre + "experts.down_proj": torch.randn(4, 128, 64, generator=g),
    }
    other = "model.language_model.layers.0.mlp.experts."
    fused.update(
        {other + "gate_up_proj": torch.zeros(4, 128, 128), other + "down_proj": torch.zeros(4, 128, 64)}
    )
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
    assert (
        F.lm_forward_flops(moe, [tokens]) - F.lm_forward_flops(dense, [tokens]) == tokens * layers * 2 * h * 4
    )


def _siglip_vision(**kw) -> VisionConfig:
    """tiny()'s encoder as SigLIP (LayerNorm eps 1e-6, biases, GELU-tanh)."""
    return dataclasses.replace(tiny().vision, family="siglip", ffn_hidden_size=96, **kw)


def test_siglip_family_config_round_trip_flops_and_export_refusal():
    from transformers import SiglipVisionConfig

    fam = families.vision_family("siglip")
    v = _siglip_vision()
    hf = SiglipVisionConfig(**{k: x for k, x in fam.hf_config(v).items() if k != "model_type"})
    assert fam.from_hf_config(hf, select_layer=-1) == v
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        fam.from_hf_config(SiglipVisionConfig(hidden_act="gelu"), select_layer=-1)
    cfg = dataclasses.replace(tiny(), vision=v)
    s = F.shape_from_model_config(cfg)
    assert (s.vit_tokens_per_tile, s.vit_class_tokens, s.vit_gated_mlp, s.tokens_per_tile) == (
        16,
        0,
        False,
        4,
    )
    with pytest.raises(ValueError, match="cannot hold a 'siglip' vision tower"):
        to_hf_config(cfg)
    assert not fam.vlm_export and families.vision_family("aimv2").vlm_export
    short = dataclasses.replace(v, num_layers=3, select_layer=-2)
    names = fam.key_map(short, "vision_model.", "").hf_names()
    assert "post_layernorm.weight" not in names and "encoder.layers.1.mlp.fc1.bias" in names
    assert fam.unused_hf(short, "", "post_layernorm.bias")
    assert fam.unused_hf(short, "", "encoder.layers.2.mlp.fc1.bias")
    assert fam.unused_hf(v, "", "head.probe") and not fam.unused_hf(v, "", "post_layernorm.bias")
    from megatron_sail.models.siglip import SigLIPEncoder

    with pytest.raises(ValueError, match="norm_type='rms_norm', qk_norm=True is not SigLIP"):
        SigLIPEncoder(dataclasses.replace(v, norm_type="rms_norm", qk_norm=True), ParallelConfig())


def test_odd_grid_pad_counts_ceil_tokens_and_hf_exports_refuse_it(tmp_path):
    from megatron_sail.config.model import ProjectorConfig
    from megatron_sail.convert import checkpoint

    with pytest.raises(ValueError, match="odd_grid must be 'error' or 'pad'"):
        ProjectorConfig(odd_grid="crop")
    pad = dataclasses.replace(tiny(), projector=ProjectorConfig(odd_grid="pad"))
    assert pad.tokens_per_tile(24) == 4 and pad.tokens_per_tile(40) == 9  # 3x3 -> 2x2, 5x5 -> 3x3
    assert pad.tokens_per_tile(32) == tiny().tokens_per_tile(32) == 4
    assert not pad.geometry(32).padded and pad.geometry(24).padded
    with pytest.raises(ValueError, match="5x5 patches not divisible by merge 2.*odd_grid='pad'"):
        tiny().tokens_per_tile(40)
    odd = dataclasses.replace(pad, vision=dataclasses.replace(pad.vision, image_size=24))
    with pytest.raises(ValueError, match="cannot express projector.odd_grid='pad'"):
        to_hf_config(odd)
    with pytest.raises(ValueError, match="zero-pads its 3x3 patch grid.*export is refused"):
        checkpoint._refuse_padded_grid(tmp_path, pad, 24)
    checkpoint._refuse_padded_grid(tmp_path, pad, 32)  # a grid that divides exports as before
    to_hf_config(pad)


@pytest.mark.parametrize("spelling", ["save_pretrained", "vision_model_prefix", "siglip_model"])
def test_siglip_folders_read_into_the_family_key_map(tmp_path, spelling):
    """SiglipVisionModel as transformers saves it, with the ``vision_model.`` prefix of older
    checkpoints, and SiglipModel (text side skipped): the pooling head is skipped and every
    other tensor is one the family map reads (compose's input)."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    from megatron_sail.convert import standalone

    fam = families.vision_family("siglip")
    v = _siglip_vision()
    vcfg = {k: x for k, x in fam.hf_config(v).items() if k != "model_type"}
    vcfg["vision_use_head"] = True
    model = SiglipVisionModel(SiglipVisionConfig(**vcfg))
    sd = model.state_dict()
    folder = tmp_path / spelling
    if spelling == "save_pretrained":
        model.save_pretrained(str(folder))
    elif spelling == "vision_model_prefix":
        folder.mkdir()
        save_file(
            {"vision_model." + k: t.contiguous() for k, t in sd.items()}, str(folder / "model.safetensors")
        )
        (folder / "config.json").write_text(json.dumps(dict(fam.hf_config(v), vision_use_head=True)))
    else:
        full = SiglipModel(
            SiglipConfig(
                vision_config=vcfg,
                text_config=dict(
                    hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2
                ),
            )
        )
        full.vision_model.load_state_dict(sd)
        full.save_pretrained(str(folder))
    part = standalone.read_vision(folder)
    assert part.family == "siglip"
    assert any("head." in k for k in part.skipped)
    if spelling == "siglip_model":
        assert any(k.startswith("text_model.") for k in part.skipped)
    got = standalone.vision_config(part, -1, 0.0)
    assert got == v
    km = fam.key_map(got, "vision_model.", standalone.VISION_PREFIX)
    assert km.hf_names() == set(part.state)
    for k, t in sd.items():
        if not k.startswith("head."):
            assert torch.equal(part.state[standalone.VISION_PREFIX + k], t), k
