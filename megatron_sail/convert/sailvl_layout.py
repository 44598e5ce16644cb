"""The SAIL-VL2 hub layout (config ``model_type`` "sailvl", remote code) <-> transformers-style keys.

Also SAIL-VL-1.6-8B's: its config says "internvl_chat" but its ``vision_config`` is Apple's
AIMv2 remote code (``model_type`` "aimv2") with the same tensor names as below.

SAIL-VL2 checkpoints (BytedanceDouyinContent/SAIL-VL2-2B: config.json and
model.safetensors.index.json; read when docs/architecture.md says) keep InternVL-chat's container - ``mlp1.{0,1,3}``
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

import torch

from megatron_sail.convert.internvl_chat import LLM_META_KEYS, layout_table
from megatron_sail.convert.rename_table import Rule
from megatron_sail.models.families import (
    language_family,
    language_family_for_architecture,
    language_family_for_hf,
    vision_family,
)
from megatron_sail.models.families.base import square_side

SAILVL_MODEL_TYPE = "sailvl"

_VISION_TYPES = ("sailvit", "aimv2")
"""``vision_config.model_type`` values of AIMv2-layout towers (SAIL-VL2; Apple's own remote code)."""

AIMV2_TOWER = [
    Rule("preprocessor.patchifier.proj.{w}", "embeddings.patch_embed.{w}"),
    Rule("preprocessor.patchifier.norm.weight", "embeddings.rms_norm.weight"),
    Rule("preprocessor.pos_embed", "embeddings.position_embedding.weight", "squeeze"),
    Rule("trunk.post_trunk_norm.weight", "rms_norm.weight"),
    Rule("trunk.blocks.{i}.attn.qkv.{w}", "encoder.layers.{i}.attention.{part}_proj.{w}", "split3"),
    Rule("trunk.blocks.{i}.attn.proj.{w}", "encoder.layers.{i}.attention.out_proj.{w}"),
    Rule("trunk.blocks.{i}.norm_1.{w}", "encoder.layers.{i}.rms_norm1.{w}"),
    Rule("trunk.blocks.{i}.norm_2.{w}", "encoder.layers.{i}.rms_norm2.{w}"),
    Rule("trunk.blocks.{i}.mlp.fc1.{w}", "encoder.layers.{i}.ffn.gate_proj.{w}"),
    Rule("trunk.blocks.{i}.mlp.fc2.{w}", "encoder.layers.{i}.ffn.down_proj.{w}"),
    Rule("trunk.blocks.{i}.mlp.fc3.{w}", "encoder.layers.{i}.ffn.up_proj.{w}"),
]
"""Apple's AIMv2 names <-> transformers' Aimv2VisionModel names (transformers' own AIMv2
conversion table: fc1 -> gate_proj, fc2 -> down_proj, fc3 -> up_proj, qkv split in thirds,
pos_embed [1, N, d] squeezed)."""

_TABLE = layout_table(AIMV2_TOWER, "sailvl")


def is_sailvl_config(config: dict) -> bool:
    """True for a SAIL-VL hub config.json with an AIMv2-layout tower: SAIL-VL2 (``model_type``
    "sailvl") and SAIL-VL-1.6-8B (``model_type`` "internvl_chat" whose ``vision_config`` is
    Apple's remote-code ``aimv2``, same tensor names; read from a GitHub copy of its files)."""
    if config.get("model_type") == SAILVL_MODEL_TYPE:
        return True
    vis = config.get("vision_config")
    return (
        config.get("model_type") == "internvl_chat"
        and isinstance(vis, dict)
        and vis.get("model_type") in _VISION_TYPES
    )


# ----------------------------------------------------------------------------- configs
def aimv2_vision_config(vis: dict, image: int):
    """transformers Aimv2VisionConfig of a sailvit/aimv2 remote-code vision_config."""
    from transformers import Aimv2VisionConfig

    if vis.get("model_type") not in _VISION_TYPES:
        raise ValueError(
            f"sailvl vision_config.model_type {vis.get('model_type')!r} is not an "
            f"AIMv2-layout tower ({', '.join(_VISION_TYPES)})"
        )
    for flag in ("qkv_bias", "use_bias"):
        if vis.get(flag):
            raise ValueError(f"sailvl vision_config.{flag}=true is not supported (SAIL-VL2 has none)")
    if square_side(vis["image_size"]) != image:
        raise ValueError(
            f"sailvl force_image_size {image} differs from vision_config.image_size "
            f"{vis['image_size']} (the position table's size): not supported"
        )
    return Aimv2VisionConfig(
        hidden_size=vis["hidden_size"],
        intermediate_size=vis["intermediate_size"],
        num_hidden_layers=vis["num_hidden_layers"],
        num_attention_heads=vis["num_attention_heads"],
        num_channels=vis.get("num_channels", 3),
        image_size=image,
        patch_size=square_side(vis["patch_size"]),
        rms_norm_eps=vis.get("rms_norm_eps", 1e-5),
        qkv_bias=False,
        mlp_bias=False,
        use_head=False,
        is_native=False,
        hidden_act="silu",
    )


def model_config(config: dict, image_token_id: int):
    """Our ModelConfig of a sailvl config.json (families from its vision / llm configs).

    ``image_token_id`` comes from the tokenizer (the config does not store it)."""
    from transformers import AutoConfig

    from megatron_sail.config.model import ModelConfig, ProjectorConfig

    if not is_sailvl_config(config):
        raise ValueError(
            f"not a {SAILVL_MODEL_TYPE} / AIMv2 internvl_chat config "
            f"(model_type={config.get('model_type')!r})"
        )
    vis, llm = config.get("vision_config"), config.get("llm_config")
    if not isinstance(vis, dict) or not isinstance(llm, dict):
        raise ValueError("sailvl config needs 'vision_config' and 'llm_config' objects")
    if config.get("ps_version", "v1") != "v2":
        raise ValueError(
            f"ps_version {config.get('ps_version', 'v1')!r}: only pixel shuffle 'v2' is supported"
        )
    arch = (llm.get("architectures") or [None])[0]
    family = (
        language_family_for_architecture(arch)
        if arch
        else language_family_for_hf(llm.get("model_type", "qwen3"))
    )
    text = AutoConfig.for_model(
        family.hf_model_type, **{k: v for k, v in llm.items() if k not in LLM_META_KEYS + ("model_type",)}
    )
    tied = bool(llm.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    image = square_side(config.get("force_image_size") or vis["image_size"])
    select = int(config.get("select_layer", -1))
    vision = vision_family("aimv2").from_hf_config(aimv2_vision_config(vis, image), select_layer=select)
    return ModelConfig(
        vision=vision,
        projector=ProjectorConfig(downsample_ratio=float(config.get("downsample_ratio", 0.5))),
        language=family.from_hf_config(text, tied=tied),
        img_context_token_id=int(image_token_id),
    )


def config_for(cfg, stored: dict) -> dict:
    """A sailvl config.json describing ``cfg``: ``stored`` (the source's, remote-code fields,
    template and tiling kept) with the vision, projector and LM shape fields replaced."""
    out = copy.deepcopy(stored)
    v, lm = cfg.vision, cfg.language
    out["vision_config"].update(
        hidden_size=v.hidden_size,
        intermediate_size=v.ffn_hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        rms_norm_eps=v.norm_eps,
        qkv_bias=False,
        use_bias=False,
    )
    fam = language_family(lm.family)
    text = {k: x for k, x in fam.hf_config(lm).items() if k != "rope_parameters"}
    text["rope_theta"] = lm.rope_theta
    out["llm_config"].update(text, architectures=[fam.hf_architecture])
    out.update(
        force_image_size=v.image_size,
        downsample_ratio=cfg.projector.downsample_ratio,
        select_layer=v.select_layer,
    )
    return out


# ----------------------------------------------------------------------------- tensors
def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sailvl tensors -> transformers-style module keys (Aimv2VisionModel names under
    ``model.vision_tower.``, InternVL's projector / LM names). Unknown tensors are an error."""
    return _TABLE.a_to_b(state)


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``to_hf_state_dict``: module keys -> sailvl keys (q/k/v fused, pos_embed [1, N, d])."""
    return _TABLE.b_to_a(state)
