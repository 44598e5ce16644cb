"""Tiny, random, separately released parts: a vision encoder or a causal-LM folder (the command
line is tools/make_tiny_hf_parts.py).

The inputs of ``convert_checkpoint.py compose`` in the formats the real releases use, with a
few-kilobyte model so that tests and the docs' demo run in seconds. The InternViT folder holds
OpenGVLab's InternVisionModel names (``embeddings.class_embedding``, ``encoder.layers.{i}.attn.qkv``,
``ls1``, ...) and config (``model_type`` intern_vit_6b); the others are written by
transformers' ``save_pretrained``. The LM folder gets a byte-level BPE tokenizer with Qwen's ChatML
tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``) but without the image tokens, as
Qwen's own tokenizers. Default shapes are the ``tiny`` recipe's (config/model.py), so
``compose --recipe tiny`` accepts them. Every tensor is distinct and random."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

PARTS = ("internvit", "aimv2", "siglip", "qwen2", "qwen3", "qwen3_moe")


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class TinyPartConfig:
    """Shape of the generated part (defaults: the tiny recipe's)."""

    part: str = "qwen2"
    """One of PARTS."""
    seed: int = 0
    """Seed of the random weights."""
    vision_hidden: int = 64
    """Encoder width."""
    vision_layers: int = 2
    """Encoder layers."""
    vision_heads: int = 4
    """Encoder heads."""
    vision_ffn: int = 128
    """Encoder MLP width."""
    patch: int = 8
    """Patch side in pixels."""
    image: int = 32
    """Image (tile) side the position table is for."""
    text_hidden: int = 128
    """LM width."""
    text_layers: int = 2
    """LM layers."""
    text_ffn: int = 256
    """LM SwiGLU width (per expert for qwen3_moe: half of it)."""
    vocab_size: int = 512
    """LM embedding rows (the tiny recipe's; the tokenizer gets ``tokenizer_size`` ids)."""
    tokenizer_size: int = 300
    """Ids of the BPE tokenizer written beside the LM (at most vocab_size to need no growth)."""
    tied: bool = True
    """Tie the LM head to the embedding."""


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Distinct random values everywhere (norm weights near 1), so a swap shows in a test."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise)


def write_internvit(out: Path, cfg: TinyPartConfig) -> Path:
    """InternVisionModel's config.json and tensors (remote-code names), float32."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(cfg.seed)
    d, f, p, n = cfg.vision_hidden, cfg.vision_ffn, cfg.patch, (cfg.image // cfg.patch) ** 2

    def r(*shape, base=0.0, scale=0.05):
        return base + scale * torch.randn(*shape, generator=gen)

    sd = {
        "embeddings.class_embedding": r(1, 1, d),
        "embeddings.position_embedding": r(1, n + 1, d),
        "embeddings.patch_embedding.weight": r(d, 3, p, p),
        "embeddings.patch_embedding.bias": r(d),
    }
    for i in range(cfg.vision_layers):
        b = f"encoder.layers.{i}."
        sd.update(
            {
                b + "attn.qkv.weight": r(3 * d, d),
                b + "attn.qkv.bias": r(3 * d),
                b + "attn.proj.weight": r(d, d),
                b + "attn.proj.bias": r(d),
                b + "mlp.fc1.weight": r(f, d),
                b + "mlp.fc1.bias": r(f),
                b + "mlp.fc2.weight": r(d, f),
                b + "mlp.fc2.bias": r(d),
                b + "norm1.weight": r(d, base=1.0, scale=0.1),
                b + "norm1.bias": r(d),
                b + "norm2.weight": r(d, base=1.0, scale=0.1),
                b + "norm2.bias": r(d),
                b + "ls1": r(d, base=0.1, scale=0.02),
                b + "ls2": r(d, base=0.1, scale=0.02),
            }
        )
    config = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": cfg.vision_heads,
        "num_channels": 3,
        "image_size": cfg.image,
        "patch_size": p,
        "qkv_bias": True,
        "qk_normalization": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "initializer_factor": 0.1,
        "drop_path_rate": 0.0,
        "use_flash_attn": False,
        "torch_dtype": "float32",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def write_aimv2(out: Path, cfg: TinyPartConfig) -> Path:
    """transformers Aimv2VisionModel (with its pooling head, which compose skips)."""
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    config = Aimv2VisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_ffn,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image,
        patch_size=cfg.patch,
    )
    model = Aimv2VisionModel(config)
    _randomize(model, cfg.seed)
    model.save_pretrained(str(out))
    return out


def write_siglip(out: Path, cfg: TinyPartConfig) -> Path:
    """transformers SiglipVisionModel (with its pooling head, which compose skips)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_ffn,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image,
        patch_size=cfg.patch,
        vision_use_head=True,
    )
    model = SiglipVisionModel(config)
    _randomize(model, cfg.seed)
    model.save_pretrained(str(out))
    return out


def write_causal_lm(out: Path, cfg: TinyPartConfig) -> Path:
    """Qwen2 / Qwen3 / Qwen3-MoE ForCausalLM via save_pretrained, plus a Qwen-like tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    heads = 4
    extra = {}
    if cfg.part in ("qwen3", "qwen3_moe"):
        extra = dict(head_dim=48, attention_bias=False)  # head_dim != hidden / heads, as Qwen3 allows
    if cfg.part == "qwen3_moe":
        extra.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=cfg.text_ffn // 2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    config = AutoConfig.for_model(
        cfg.part,
        hidden_size=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        intermediate_size=cfg.text_ffn,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=cfg.tied,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config)
    _randomize(model, cfg.seed)
    model.save_pretrained(str(out))
    write_qwen_like_tokenizer(out, cfg.tokenizer_size)
    return out


def write_qwen_like_tokenizer(out: Path, size: int) -> int:
    """A byte-level BPE of ``size`` ids with Qwen's three ChatML/end tokens as its last ids (as
    Qwen's tokenizers: <|endoftext|> then <|im_start|>, <|im_end|>) and no image tokens."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size - len(QWEN_SPECIALS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [
        "system\n",
        "user\n",
        "assistant\n",
        "Describe this image in detail.",
        "What is in the picture?",
        "a red circle on a blue square",
        "the quick brown fox",
    ] * 4
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(out))
    if len(fast) != size:
        raise ValueError(f"tokenizer has {len(fast)} ids, wanted {size} (too little training text)")
    return len(fast)


def make_part(out: str | Path, cfg: TinyPartConfig = TinyPartConfig()) -> Path:
    """Write one part folder (refuses a non-empty ``out``)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty")
    if cfg.part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {cfg.part!r}")
    writer = {"internvit": write_internvit, "aimv2": write_aimv2, "siglip": write_siglip}.get(
        cfg.part, write_causal_lm
    )
    return writer(out, cfg)
