"""A small random SAIL-VL-shaped checkpoint in transformers' or InternVL-chat's layout (the command
line is tools/make_tiny_hf_checkpoint.py).

Used by the conversion tests and the README demo: real SAIL-VL weights are gigabytes, but the
conversion and logit-comparison code paths are the same for a model of a few hundred kilobytes.
Every tensor gets distinct random values (norm weights and layer scales included) so that a
swapped or dropped tensor in a conversion shows up as a mismatch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sail.convert import hf_io, internvl_chat


@dataclass(frozen=True)
class TinyCheckpointConfig:
    """Shape and format of the generated checkpoint."""

    layout: str = "hf"
    """'hf' (transformers InternVLForConditionalGeneration) or 'chat' (internvl_chat, SAIL-VL hub)."""
    seed: int = 0
    """Seed of the random weights."""
    tile_size: int = 56
    """ViT input size in pixels (patch 14: 4x4 patches, 4 visual tokens per tile)."""
    vision_layers: int = 2
    """InternViT layers."""
    select_layer: int = -1
    """ViT layer feeding the projector (-2: the last layer is unused, as some InternVL models)."""
    text_layers: int = 2
    """Qwen2 layers."""
    text_family: str = "qwen2"
    """Text model family: 'qwen2', 'qwen3' (QK-norm, no qkv bias, head_dim 24 != 64 / heads) or
    'qwen3_moe' (Qwen3 attention, 4 routed experts of width 32 per layer, top-2, renormalized)."""
    heads: int = 4
    """Qwen2 attention heads (hidden 64, head dim 16)."""
    kv_heads: int = 2
    """Qwen2 key/value heads (GQA)."""
    vocab_size: int = 256
    """Qwen2 vocabulary; the image-context token is its last id."""
    tied: bool = False
    """Tie the LM head to the input embeddings."""
    dtype: str = "float32"
    """Stored dtype: float32 or bfloat16."""
    max_shard_bytes: int = 5 * 1024**3
    """Split the safetensors into shards above this size (small values force a sharded folder)."""
    tokenizer: bool = False
    """Also write a byte-level BPE ``tokenizer.json`` with the ChatML/image special tokens (needs
    vocab_size >= 262); the image-context id then comes from it instead of being the last id."""


def build_hf_config(cfg: TinyCheckpointConfig) -> dict:
    """transformers InternVLConfig dict of the tiny model (SAIL-VL's structure, tiny widths)."""
    tokens_per_side = cfg.tile_size // 14 // 2
    return {
        "model_type": "internvl",
        "architectures": ["InternVLForConditionalGeneration"],
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": 32,
            "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": [cfg.tile_size] * 2,
            "patch_size": [14, 14],
            "attention_bias": True,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "use_mean_pooling": True,
            "hidden_act": "gelu",
        },
        "text_config": {
            "model_type": "qwen2",
            "hidden_size": 64,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.heads,
            "num_key_value_heads": cfg.kv_heads,
            "intermediate_size": 128,
            "vocab_size": cfg.vocab_size,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": cfg.tied,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            **(
                {
                    "model_type": cfg.text_family,
                    "head_dim": 24,
                    "attention_bias": False,
                    "use_sliding_window": False,
                }
                if cfg.text_family in ("qwen3", "qwen3_moe")
                else {}
            ),
            **(
                {
                    "num_experts": 4,
                    "num_experts_per_tok": 2,
                    "moe_intermediate_size": 32,
                    "norm_topk_prob": True,
                    "decoder_sparse_step": 1,
                    "mlp_only_layers": [],
                    "router_aux_loss_coef": 0.001,
                }
                if cfg.text_family == "qwen3_moe"
                else {}
            ),
        },
        "image_token_id": cfg.vocab_size - 1,
        "image_seq_length": tokens_per_side**2,
        "downsample_ratio": 0.5,
        "vision_feature_layer": cfg.select_layer,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": cfg.tied,
        "dtype": cfg.dtype,
    }


def random_state_dict(hf_config: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Module-keyed weights of InternVLForConditionalGeneration, every tensor distinct and random,
    named as ``save_pretrained`` writes them (one tensor per expert for MoE text models)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from megatron_sail.convert.hf_internvl import (
        from_hf_config,
        from_transformers_params,
    )

    config = InternVLConfig(**hf_config)
    model = InternVLForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and hf_config["tie_word_embeddings"]:
            continue  # tied: transformers stores only the embedding
        noise = torch.randn(tensor.shape, generator=gen)
        if name.endswith("norm.weight") or "layernorm" in name and name.endswith("weight"):
            value = 1.0 + 0.1 * noise
        elif "lambda_" in name:
            value = 0.1 + 0.02 * noise
        else:
            value = 0.05 * noise
        state[name] = value.to(dtype)
    return from_transformers_params(state, from_hf_config(config))


def write_tokenizer(folder: Path, vocab_size: int) -> int:
    """Train a tiny byte-level BPE with the template's special tokens into ``folder``/tokenizer.json
    (so tools see real ChatML tokenization); return the id of <IMG_CONTEXT>."""
    from tokenizers import Tokenizer

    from megatron_sail.demo.generator import train_tokenizer

    texts = ["Describe this image in detail.", "What is in the picture?", "a red circle on blue"]
    path = folder / "tokenizer.json"
    train_tokenizer(texts, str(path), vocab_size=vocab_size)
    tok = Tokenizer.from_file(str(path))
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer needs {tok.get_vocab_size()} ids but vocab_size is {vocab_size}")
    return tok.token_to_id(internvl_chat.IMG_CONTEXT)


def make_tiny_checkpoint(out: str | Path, cfg: TinyCheckpointConfig = TinyCheckpointConfig()) -> Path:
    """Write the tiny checkpoint folder (config.json + safetensors [+ tokenizer]) atomically."""
    import tempfile

    if cfg.layout not in ("hf", "chat"):
        raise ValueError(f"layout must be 'hf' or 'chat', got {cfg.layout!r}")
    with tempfile.TemporaryDirectory() as tok_dir:
        image_token = write_tokenizer(Path(tok_dir), cfg.vocab_size) if cfg.tokenizer else None
        return _write(out, cfg, image_token, Path(tok_dir) if cfg.tokenizer else None)


def _write(out, cfg: TinyCheckpointConfig, image_token: int | None, tokenizer_from: Path | None) -> Path:
    """Random weights in the chosen layout, written with the tokenizer files (if any)."""
    hf_config = build_hf_config(cfg)
    if image_token is not None:
        hf_config["image_token_id"] = image_token
    state = random_state_dict(hf_config, cfg.seed, getattr(torch, cfg.dtype))
    if cfg.layout == "chat":
        config = internvl_chat.hf_config_to_chat(hf_config)
        config["torch_dtype"] = cfg.dtype
        state = internvl_chat.hf_to_chat_state_dict(state)
    else:
        config, state = hf_config, hf_io.to_disk_keys(state)
    write = hf_io.HFWriteConfig(max_shard_bytes=cfg.max_shard_bytes)
    return hf_io.write_checkpoint(out, config, state, tokenizer_from=tokenizer_from, cfg=write)
