"""Separately released parts read on their own: a vision encoder folder and a causal-LM folder.

SAIL-VL training starts from a pretrained encoder (InternViT-300M-448px, AIMv2-Huge) and a
pretrained LLM (Qwen2.5, Qwen3, Qwen3-MoE) published apart. Each reader here brings one folder's
tensors to the module keys that transformers' InternVL container uses for that part
(``model.vision_tower.*`` / ``model.language_model.*`` + ``lm_head.weight``), so that the
families' key maps (``models/families``) turn them into our parameter names as they do for
whole checkpoints. Every step renames or splits without changing a value.

Vision folders, chosen by ``config.json``'s ``model_type``:

* ``intern_vit_6b``: OpenGVLab's remote-code ``InternVisionModel`` (InternViT-300M-448px,
  InternViT-6B): ``embeddings.{class_embedding,patch_embedding,position_embedding}``,
  ``encoder.layers.{i}.{attn.qkv,attn.proj,norm1,norm2,ls1,ls2,mlp.fc1,mlp.fc2}`` - the names
  InternVL-chat stores under ``vision_model.``, mapped by internvl_chat.py;
* ``internvl_vision``: transformers' ``InternVLVisionModel`` (names as the family map reads);
* ``aimv2_vision_model``: transformers' ``Aimv2VisionModel``; ``aimv2`` with a
  ``vision_config``: transformers' ``Aimv2Model`` (its ``vision_model.*``; the text tower and
  projections are skipped); ``aimv2`` without one: Apple's remote-code AIMv2
  (``preprocessor.*`` / ``trunk.*``, mapped by sailvl_layout.py). The attention-pooling
  ``head.*`` of AIMv2 is not part of SAIL-VL's encoder and is skipped.
* ``siglip_vision_model``: transformers' ``SiglipVisionModel`` (fixed-resolution SigLIP and
  SigLIP2), with or without the ``vision_model.`` prefix older checkpoints carry; ``siglip``:
  transformers' ``SiglipModel`` (its ``vision_model.*``; the text side is skipped). The
  attention-pooling ``head.*`` is skipped.

LM folders: ``config.json`` ``model_type`` of a registered language family (qwen2, qwen3,
qwen3_moe), tensors ``model.*`` and ``lm_head.weight`` (absent or equal to the embedding when
tied).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_sail.convert import hf_io, internvl_chat, sailvl_layout
from megatron_sail.models.families import LANGUAGE_FAMILIES, language_family_for_hf, vision_family
from megatron_sail.models.families.base import square_side

VISION_PREFIX = "model.vision_tower."
LM_PREFIX = "model.language_model."
LM_HEAD = "lm_head.weight"

INTERNVIT_REMOTE = "intern_vit_6b"
INTERNVIT_HF = "internvl_vision"
AIMV2_VISION = "aimv2_vision_model"
AIMV2 = "aimv2"
SIGLIP_VISION = "siglip_vision_model"
SIGLIP = "siglip"
VISION_TYPES = (INTERNVIT_REMOTE, INTERNVIT_HF, AIMV2_VISION, AIMV2, SIGLIP_VISION, SIGLIP)
"""Vision ``model_type`` values ``compose`` reads."""
_AIMV2_SKIPPED = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
"""transformers ``Aimv2Model`` tensors outside its vision tower (a CLIP-style text side)."""
_SIGLIP_SKIPPED = ("text_model.", "logit_scale", "logit_bias")
"""transformers ``SiglipModel`` tensors outside its vision tower."""


@dataclass
class VisionPart:
    """A vision encoder folder read into transformers' vision-tower names."""

    family: str
    """Vision family name (models/families)."""
    hf_config: object
    """The family's transformers vision config object (InternVLVisionConfig / Aimv2VisionConfig)."""
    state: dict
    """Tensors under ``model.vision_tower.`` + transformers' names."""
    skipped: list = field(default_factory=list)
    """Source tensors that are not part of SAIL-VL's encoder (pooling head, text tower)."""
    source_type: str = ""
    """config.json ``model_type`` of the folder."""


@dataclass
class LanguagePart:
    """A causal-LM folder read into transformers' InternVL text-model names."""

    family: str
    """Language family name."""
    hf_config: object
    """transformers text config object (Qwen2Config, Qwen3Config, Qwen3MoeConfig)."""
    tied: bool
    """Whether the output layer is the input embedding."""
    state: dict
    """Tensors under ``model.language_model.`` (+ ``lm_head.weight`` when untied)."""


def _prefixed(state: dict, old: str, new: str) -> dict:
    """Keys starting with ``old`` renamed to start with ``new`` (others dropped)."""
    return {new + k[len(old) :]: v for k, v in state.items() if k.startswith(old)}


def read_vision(folder: str | Path) -> VisionPart:
    """The encoder of a standalone vision folder; other model types are refused by name."""
    folder = Path(folder)
    config = hf_io.read_config(folder)
    kind = config.get("model_type")
    if kind not in VISION_TYPES:
        raise ValueError(
            f"{folder}/config.json: vision model_type {kind!r} is not supported; supported: "
            f"{INTERNVIT_REMOTE!r} (InternViT remote code, e.g. OpenGVLab/InternViT-300M-448px), "
            f"{INTERNVIT_HF!r} (transformers InternVLVisionModel), {AIMV2_VISION!r} "
            f"(transformers Aimv2VisionModel), {AIMV2!r} (transformers Aimv2Model or Apple's "
            f"remote-code AIMv2), {SIGLIP_VISION!r} (transformers SiglipVisionModel), {SIGLIP!r} "
            "(transformers SiglipModel)"
        )
    raw = hf_io.read_state_dict(folder)
    if kind == INTERNVIT_REMOTE:
        return _internvit_remote(folder, config, raw)
    if kind == INTERNVIT_HF:
        from transformers import InternVLVisionConfig

        hf = InternVLVisionConfig.from_dict(_fields(config))
        return VisionPart("internvit", hf, _prefixed(raw, "", VISION_PREFIX), [], kind)
    if kind in (SIGLIP_VISION, SIGLIP):
        return _siglip(folder, config, raw)
    return _aimv2(folder, config, raw)


def _fields(config: dict) -> dict:
    """config.json without the bookkeeping keys a config class does not take."""
    return {
        k: v
        for k, v in config.items()
        if k not in ("architectures", "auto_map", "transformers_version", "_name_or_path")
    }


def _unknown(folder: Path, names, what: str) -> None:
    """Refuse tensors with no known place (a silent drop would hide a wrong folder)."""
    names = sorted(names)
    if names:
        raise ValueError(f"{folder}: {what} has tensors with no known mapping: {names[:8]}")


def _internvit_remote(folder: Path, config: dict, raw: dict) -> VisionPart:
    """InternVisionModel: InternVL-chat's ``vision_model.*`` names without the prefix."""
    from transformers import InternVLVisionConfig

    _unknown(
        folder,
        [k for k in raw if not k.startswith(("embeddings.", "encoder.layers."))],
        "the InternViT folder",
    )
    image = square_side(config["image_size"])
    patch = square_side(config["patch_size"])
    hf = InternVLVisionConfig.from_dict(internvl_chat.intern_vit_config_to_hf(config, image, patch))
    try:
        state = internvl_chat.chat_to_hf_state_dict(_prefixed(raw, "", "vision_model."))
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from e
    return VisionPart("internvit", hf, state, [], INTERNVIT_REMOTE)


def _aimv2(folder: Path, config: dict, raw: dict) -> VisionPart:
    """The three AIMv2 spellings: Aimv2VisionModel, Aimv2Model's vision tower, Apple's code."""
    from transformers import Aimv2VisionConfig

    kind = config["model_type"]
    if kind == AIMV2_VISION:
        hf, tower = Aimv2VisionConfig.from_dict(_fields(config)), raw
        skipped = []
    elif isinstance(config.get("vision_config"), dict):  # transformers Aimv2Model
        hf = Aimv2VisionConfig.from_dict(_fields(config["vision_config"]))
        skipped = [k for k in raw if k.startswith(_AIMV2_SKIPPED)]
        tower = _prefixed(raw, "vision_model.", "")
        _unknown(
            folder, set(raw) - set(skipped) - {"vision_model." + k for k in tower}, "the Aimv2Model folder"
        )
    else:  # Apple's remote code: original names, flat config
        hf = sailvl_layout.aimv2_vision_config(config, square_side(config["image_size"]))
        skipped = [k for k in raw if k.startswith("head.")]
        rest = {k: v for k, v in raw.items() if not k.startswith("head.")}
        try:
            state = sailvl_layout.to_hf_state_dict(_prefixed(rest, "", "vision_model."))
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from e
        return VisionPart("aimv2", hf, state, skipped, kind)
    head = [k for k in tower if k.startswith("head.")]
    prefix = "vision_model." if kind != AIMV2_VISION else ""
    skipped += [prefix + k for k in head]
    state = {VISION_PREFIX + k: v for k, v in tower.items() if not k.startswith("head.")}
    return VisionPart("aimv2", hf, state, sorted(set(skipped)), kind)


def _siglip(folder: Path, config: dict, raw: dict) -> VisionPart:
    """SiglipVisionModel (names as transformers holds them, or with the ``vision_model.``
    prefix that checkpoints written before transformers 5 carry) or SiglipModel's vision tower;
    the pooling head ``head.*`` and a text side are skipped."""
    from transformers import SiglipVisionConfig

    kind = config["model_type"]
    if kind == SIGLIP:
        if not isinstance(config.get("vision_config"), dict):
            raise ValueError(f"{folder}/config.json: model_type 'siglip' without a vision_config")
        hf = SiglipVisionConfig.from_dict(_fields(config["vision_config"]))
    else:
        hf = SiglipVisionConfig.from_dict(_fields(config))
    skipped = [k for k in raw if k.startswith(_SIGLIP_SKIPPED)] if kind == SIGLIP else []
    prefixed = kind == SIGLIP or any(k.startswith("vision_model.") for k in raw)
    prefix = "vision_model." if prefixed else ""
    tower = _prefixed(raw, prefix, "")
    _unknown(folder, set(raw) - set(skipped) - {prefix + k for k in tower}, f"the {kind} folder")
    skipped += [prefix + k for k in tower if k.startswith("head.")]
    state = {VISION_PREFIX + k: v for k, v in tower.items() if not k.startswith("head.")}
    return VisionPart("siglip", hf, state, sorted(set(skipped)), kind)


def vision_config(part: VisionPart, select_layer: int, drop_path_rate: float):
    """Our VisionConfig of a read vision part."""
    return vision_family(part.family).from_hf_config(
        part.hf_config, select_layer=select_layer, drop_path_rate=drop_path_rate
    )


def read_language(folder: str | Path) -> LanguagePart:
    """The decoder of a causal-LM folder (Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM)."""
    from transformers import AutoConfig

    folder = Path(folder)
    config = hf_io.read_config(folder)
    kind = config.get("model_type")
    try:
        family = language_family_for_hf(kind)
    except ValueError:
        known = ", ".join(f"{f.hf_model_type!r} ({f.hf_architecture})" for f in LANGUAGE_FAMILIES.values())
        raise ValueError(
            f"{folder}/config.json: language model_type {kind!r} is not supported; supported: {known}"
        ) from None
    text = AutoConfig.for_model(kind, **{k: v for k, v in _fields(config).items() if k != "model_type"})
    tied = bool(getattr(text, "tie_word_embeddings", False))
    raw = hf_io.read_state_dict(folder)
    _unknown(folder, [k for k in raw if not k.startswith("model.") and k != LM_HEAD], "the causal-LM folder")
    state = _prefixed(raw, "model.", LM_PREFIX)
    embed = state.get(LM_PREFIX + "embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{folder}: no model.embed_tokens.weight")
    if embed.shape[0] != text.vocab_size:
        raise ValueError(
            f"{folder}: model.embed_tokens.weight has {embed.shape[0]} rows but "
            f"config.json vocab_size is {text.vocab_size}"
        )
    head = raw.get(LM_HEAD)
    if tied and head is not None and not torch.equal(head, embed):
        raise ValueError(
            f"{folder}: tie_word_embeddings is true but lm_head.weight differs from "
            "the embedding (tying would drop it)"
        )
    if not tied:
        if head is None:
            raise ValueError(f"{folder}: tie_word_embeddings is false but there is no lm_head.weight")
        state[LM_HEAD] = head
    return LanguagePart(family.name, text, tied, state)
