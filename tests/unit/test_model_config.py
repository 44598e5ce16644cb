"""Model/parallel configs and the HF config mapping (no processes, no model weights)."""

import dataclasses

import pytest

from megatron_sail.config.model import ModelConfig, VisionConfig, sail_2b, sail_8b, tiny
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.convert.hf_internvl import from_hf_config, to_hf_config


def test_sail_recipes_have_published_shapes():
    for cfg in (sail_2b(), sail_8b()):
        v = cfg.vision
        assert (v.hidden_size, v.num_layers, v.num_heads, v.ffn_hidden_size) == (1024, 24, 16, 4096)
        assert (v.patch_size, v.image_size, v.norm_eps, v.layer_scale_init) == (14, 448, 1e-6, 0.1)
        assert v.qkv_bias and not v.qk_norm and v.drop_path_rate == 0.1 and v.select_layer == -1
        assert cfg.tokens_per_tile() == 256 and cfg.projector.downsample_ratio == 0.5
        assert cfg.language.rope_theta == 1e6 and cfg.language.norm_eps == 1e-6
    lm2, lm8 = sail_2b().language, sail_8b().language
    assert (
        lm2.hidden_size,
        lm2.num_layers,
        lm2.num_heads,
        lm2.num_kv_heads,
        lm2.ffn_hidden_size,
        lm2.vocab_size,
        lm2.tie_embeddings,
    ) == (1536, 28, 12, 2, 8960, 151936, True)
    assert (
        lm8.hidden_size,
        lm8.num_layers,
        lm8.num_heads,
        lm8.num_kv_heads,
        lm8.ffn_hidden_size,
        lm8.vocab_size,
        lm8.tie_embeddings,
    ) == (3584, 28, 28, 4, 18944, 152064, False)


def test_tiny_vocab_is_a_parameter_and_tokens_per_tile_follow_tile_size():
    cfg = tiny(vocab_size=1000)
    assert cfg.language.vocab_size == 1000 and cfg.img_context_token_id == 999
    assert cfg.tokens_per_tile() == 4 and cfg.tokens_per_tile(64) == 16
    with pytest.raises(ValueError, match="not divisible"):
        cfg.tokens_per_tile(40)  # 5x5 patches cannot be merged 2x2


def test_select_layer_decides_how_many_layers_run():
    assert VisionConfig(num_layers=24, select_layer=-1).layers_used == 24
    assert VisionConfig(num_layers=24, select_layer=-4).layers_used == 21
    assert VisionConfig(num_layers=24, select_layer=6).layers_used == 6
    with pytest.raises(ValueError, match="select_layer"):
        VisionConfig(num_layers=4, select_layer=-5)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="norm_type"):
        VisionConfig(norm_type="batch_norm")
    with pytest.raises(ValueError):
        ParallelConfig(tp=0)
    with pytest.raises(ValueError, match="vpp"):
        ParallelConfig(pp=1, vpp=2)
    assert ParallelConfig(tp=1, sp=True).sequence_parallel is False
    assert ParallelConfig(tp=2, sp=True).sequence_parallel is True
    assert ParallelConfig(tp=2, pp=2).data_parallel_size(8) == 2
    with pytest.raises(ValueError, match="divisible"):
        ParallelConfig(tp=2, pp=2).data_parallel_size(6)


@pytest.mark.parametrize("cfg", [sail_2b(), sail_8b(), tiny()], ids=["2b", "8b", "tiny"])
def test_hf_config_round_trip(cfg: ModelConfig):
    hf = to_hf_config(cfg)
    assert hf.text_config.num_key_value_heads == cfg.language.num_kv_heads
    assert hf.vision_config.use_mean_pooling  # no final ViT LayerNorm, as InternViT
    back = from_hf_config(hf, drop_path_rate=cfg.vision.drop_path_rate)
    assert back == cfg


def test_hf_config_with_unsupported_strategy_is_rejected():
    hf = to_hf_config(tiny())
    hf.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="select_strategy"):
        from_hf_config(hf)
    assert dataclasses.asdict(from_hf_config(to_hf_config(tiny())))["vision"]["drop_path_rate"] == 0.0
