"""The SAIL-VL2 hub layout (config ``model_type`` "sailvl", remote code) <-> transformers-style keys.

Also SAIL-VL-1.6-8B's: its config says "internvl_chat" but its ``vision_config`` is Apple's
AIMv2 remote code (``model_type`` "aimv2") with the same tensor names as below.

SAIL-VL2 checkpoints (BytedanceDouyinContent/SAIL-VL2-2B: config.json and
model.safetensors.index.json, checked 2026-12) keep InternVL-chat's container - ``mlp1.{0,1,3}``
projector, ``language_model.model.*`` / ``language_model.lm_head.weight`` (Qwen3ForCausalLM),
``llm_config``, ``select_layer``, ``downsample_ratio``, ``ps_version``, ``force_image_size``,
dynamic-patch fields - but their vision tower is SAILViT, whose configuration file is a copy of
Apple's AIMv2-Huge-448 remote code (``vision_config.model_type`` "sailvit") and whose tensors
keep Apple's original AIMv2 names:

    vision_model.preprocessor.patchifier.proj.{weight,bias}   patch conv
    vision_model.preprocessor.patchifier.norm.weight          RMSNorm after it
    vision_model.preprocessor.pos_embed                       [1, N, d] learned positions
    vision_model.trunk.blocks.{i}.norm_1 / norm_2             RMSNorms
    vision_model.trunk.blocks.{i}.attn.qkv.weight             fused [q; k; v], no bias
    vision_model.trunk.blocks.{i}.attn.proj.weight            output projection
    vision_model.trunk.blocks.{i}.mlp.fc1 / fc3 / fc2         SwiGLU gate / up / down
    vision_model.trunk.post_trunk_norm.weight                 final RMSNorm

These are mapped here to the names of transformers' ``Aimv2VisionModel`` (the same table as
transformers' own AIMv2 conversion script: fc1 -> gate_proj, fc2 -> down_proj, fc3 -> up_proj,
qkv split in thirds, pos_embed squeezed) under ``model.vision_tower.``, and the rest to
transformers' InternVL module keys, so the families' key maps convert them to our parameters.
Every step renames, splits or reshapes without changing a value: both directions are bit-exact.
"""
from __future__ import annotations

import copy
import re

import torch

from megatron_sail.convert.internvl_chat import (_LLM_META_KEYS, _size, container_from_hf,
                                                 container_to_hf)
from megatron_sail.models.families import (language_family, language_family_for_architecture,
                                           language_family_for_hf, vision_family)

SAILVL_MODEL_TYPE = "sailvl"

_CHAT_VIT = "vision_model."
_HF_VIT = "model.vision_tower."
_VISION_TYPES = ("sailvit", "aimv2")
"""``vision_config.model_type`` values of AIMv2-layout towers (SAIL-VL2; Apple's own remote code)."""

_EMBED = {
    "preprocessor.patchifier.proj.weight": "embeddings.patch_embed.weight",
    "preprocessor.patchifier.proj.bias": "embeddings.patch_embed.bias",
    "preprocessor.patchifier.norm.weight": "embeddings.rms_norm.weight",
    "trunk.post_trunk_norm.weight": "rms_norm.weight",
}
_BLOCK = {"norm_1": "rms_norm1", "norm_2": "rms_norm2", "attn.proj": "attention.out_proj",
          "mlp.fc1": "ffn.gate_proj", "mlp.fc2": "ffn.down_proj", "mlp.fc3": "ffn.up_proj"}
_POS, _HF_POS = "preprocessor.pos_embed", "embeddings.position_embedding.weight"
_BLOCK_RE = re.compile(r"trunk\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_EMBED_FROM_HF = {v: k for k, v in _EMBED.items()}
_BLOCK_FROM_HF = {v: k for k, v in _BLOCK.items()}


def is_sailvl_config(config: dict) -> bool:
    """True for a SAIL-VL hub config.json with an AIMv2-layout tower: SAIL-VL2 (``model_type``
    "sailvl") and SAIL-VL-1.6-8B (``model_type`` "internvl_chat" whose ``vision_config`` is
    Apple's remote-code ``aimv2``, same tensor names; read from a GitHub copy of its files)."""
    if config.get("model_type") == SAILVL_MODEL_TYPE:
        return True
    vis = config.get("vision_config")
    return (config.get("model_type") == "internvl_chat" and isinstance(vis, dict)
            and vis.get("model_type") in _VISION_TYPES)


# ----------------------------------------------------------------------------- configs
def _aimv2_vision_config(vis: dict, image: int):
    """transformers Aimv2VisionConfig of a sailvit/aimv2 remote-code vision_config."""
    from transformers import Aimv2VisionConfig

    if vis.get("model_type") not in _VISION_TYPES:
        raise ValueError(f"sailvl vision_config.model_type {vis.get('model_type')!r} is not an "
                         f"AIMv2-layout tower ({', '.join(_VISION_TYPES)})")
    for flag in ("qkv_bias", "use_bias"):
        if vis.get(flag):
            raise ValueError(f"sailvl vision_config.{flag}=true is not supported (SAIL-VL2 has none)")
    if _size(vis["image_size"]) != image:
        raise ValueError(f"sailvl force_image_size {image} differs from vision_config.image_size "
                         f"{vis['image_size']} (the position table's size): not supported")
    return Aimv2VisionConfig(
        hidden_size=vis["hidden_size"], intermediate_size=vis["intermediate_size"],
        num_hidden_layers=vis["num_hidden_layers"], num_attention_heads=vis["num_attention_heads"],
        num_channels=vis.get("num_channels", 3), image_size=image, patch_size=_size(vis["patch_size"]),
        rms_norm_eps=vis.get("rms_norm_eps", 1e-5), qkv_bias=False, mlp_bias=False, use_head=False,
        is_native=False, hidden_act="silu")


def model_config(config: dict, image_token_id: int):
    """Our ModelConfig of a sailvl config.json (families from its vision / llm configs).

    ``image_token_id`` comes from the tokenizer (the config does not store it)."""
    from transformers import AutoConfig

    from megatron_sail.config.model import ModelConfig, ProjectorConfig

    if not is_sailvl_config(config):
        raise ValueError(f"not a {SAILVL_MODEL_TYPE} / AIMv2 internvl_chat config "
                         f"(model_type={config.get('model_type')!r})")
    vis, llm = config.get("vision_config"), config.get("llm_config")
    if not isinstance(vis, dict) or not isinstance(llm, dict):
        raise ValueError("sailvl config needs 'vision_config' and 'llm_config' objects")
    if config.get("ps_version", "v1") != "v2":
        raise ValueError(f"ps_version {config.get('ps_version', 'v1')!r}: only pixel shuffle 'v2' is supported")
    arch = (llm.get("architectures") or [None])[0]
    family = (language_family_for_architecture(arch) if arch else
              language_family_for_hf(llm.get("model_type", "qwen3")))
    text = AutoConfig.for_model(family.hf_model_type,
                                **{k: v for k, v in llm.items() if k not in _LLM_META_KEYS + ("model_type",)})
    tied = bool(llm.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    image = _size(config.get("force_image_size") or vis["image_size"])
    select = int(config.get("select_layer", -1))
    vision = vision_family("aimv2").from_hf_config(_aimv2_vision_config(vis, image), select_layer=select)
    return ModelConfig(vision=vision,
                       projector=ProjectorConfig(downsample_ratio=float(config.get("downsample_ratio", 0.5))),
                       language=family.from_hf_config(text, tied=tied),
                       img_context_token_id=int(image_token_id))


def config_for(cfg, stored: dict) -> dict:
    """A sailvl config.json describing ``cfg``: ``stored`` (the source's, remote-code fields,
    template and tiling kept) with the vision, projector and LM shape fields replaced."""
    out = copy.deepcopy(stored)
    v, lm = cfg.vision, cfg.language
    out["vision_config"].update(
        hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        rms_norm_eps=v.norm_eps, qkv_bias=False, use_bias=False)
    fam = language_family(lm.family)
    text = {k: x for k, x in fam.hf_config(lm).items() if k != "rope_parameters"}
    text["rope_theta"] = lm.rope_theta
    out["llm_config"].update(text, architectures=[fam.hf_architecture])
    out.update(force_image_size=v.image_size, downsample_ratio=cfg.projector.downsample_ratio,
               select_layer=v.select_layer)
    return out


# ----------------------------------------------------------------------------- tensors
def _vision_to_hf(name: str, value: torch.Tensor, out: dict) -> bool:
    """One ``vision_model.*`` tensor (prefix removed) into ``out``; False if unknown."""
    if name in _EMBED:
        out[_HF_VIT + _EMBED[name]] = value
        return True
    if name == _POS:
        if value.dim() != 3 or value.shape[0] != 1:
            raise ValueError(f"vision_model.{name}: expected shape [1, N, d], got {tuple(value.shape)}")
        out[_HF_VIT + _HF_POS] = value[0]
        return True
    m = _BLOCK_RE.match(name)
    if not m:
        return False
    layer, module, kind = m.groups()
    base = f"{_HF_VIT}encoder.layers.{layer}."
    if module == "attn.qkv":
        if value.shape[0] % 3:
            raise ValueError(f"vision_model.{name}: fused qkv first dim {value.shape[0]} is not divisible by 3")
        for part, chunk in zip("qkv", value.chunk(3, dim=0)):
            out[f"{base}attention.{part}_proj.{kind}"] = chunk.clone()
        return True
    if module in _BLOCK:
        out[f"{base}{_BLOCK[module]}.{kind}"] = value
        return True
    return False


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sailvl tensors -> transformers-style module keys (Aimv2VisionModel names under
    ``model.vision_tower.``, InternVL's projector / LM names). Unknown tensors are an error."""
    return container_to_hf(state, _vision_to_hf, "sailvl")


def _vision_from_hf(name: str, value: torch.Tensor, out: dict, pending: dict) -> bool:
    """One ``model.vision_tower.*`` tensor back to the AIMv2 names; q/k/v wait in ``pending``."""
    if name in _EMBED_FROM_HF:
        out[_CHAT_VIT + _EMBED_FROM_HF[name]] = value
        return True
    if name == _HF_POS:
        out[_CHAT_VIT + _POS] = value[None].contiguous()
        return True
    m = _HF_LAYER_RE.match(name)
    if not m:
        return False
    layer, module, kind = m.groups()
    base = f"{_CHAT_VIT}trunk.blocks.{layer}."
    qkv = re.match(r"attention\.([qkv])_proj$", module)
    if qkv:
        pending.setdefault(f"{base}attn.qkv.{kind}", {})[qkv.group(1)] = value
        return True
    if module in _BLOCK_FROM_HF:
        out[f"{base}{_BLOCK_FROM_HF[module]}.{kind}"] = value
        return True
    return False


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``to_hf_state_dict``: module keys -> sailvl keys (q/k/v fused, pos_embed [1, N, d])."""
    return container_from_hf(state, _vision_from_hf, "sailvl")
