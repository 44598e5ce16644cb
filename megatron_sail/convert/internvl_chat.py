"""The InternVL-chat checkpoint layout (what SAIL-VL publishes) <-> transformers' InternVL layout.

SAIL-VL checkpoints follow OpenGVLab's original remote-code model (config ``model_type``
"internvl_chat"): the vision tower is ``vision_model.*`` with InternViT's own names (one fused
``attn.qkv``, ``norm1``/``norm2``, ``ls1``/``ls2``), the projector is an ``nn.Sequential`` called
``mlp1`` (LayerNorm, Linear, GELU, Linear), and the language model is a Qwen2ForCausalLM under
``language_model.*``. transformers ships the same network as InternVLForConditionalGeneration with
different names and a split q/k/v; this module renames and splits/fuses, never changing a value,
so the two layouts convert into each other bit for bit.

State dicts on the transformers side use the in-memory module keys (``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``); see
``hf_io.to_module_keys`` for the on-disk spelling.
"""

from __future__ import annotations

import torch

from megatron_sail.convert.rename_table import RenameTable, Rule, prefixed
from megatron_sail.models.families import language_family_for_architecture, language_family_for_hf
from megatron_sail.models.families.base import square_side

IMG_CONTEXT = "<IMG_CONTEXT>"
"""The token whose embeddings are replaced by visual tokens (InternVL's name)."""

CHAT_MODEL_TYPE = "internvl_chat"

LLM_META_KEYS = (
    "architectures",
    "auto_map",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "attn_implementation",
    "_attn_implementation",
)

_CHAT_VIT = "vision_model."
_HF_VIT = "model.vision_tower."

CONTAINER = [
    Rule("mlp1.0.{rest}", "model.multi_modal_projector.layer_norm.{rest}"),
    Rule("mlp1.1.{rest}", "model.multi_modal_projector.linear_1.{rest}"),
    Rule("mlp1.3.{rest}", "model.multi_modal_projector.linear_2.{rest}"),
    Rule("language_model.model.{rest}", "model.language_model.{rest}"),
    Rule("language_model.lm_head.weight", "lm_head.weight"),
]
"""InternVL-chat's container (projector ``mlp1`` = LayerNorm, Linear, GELU, Linear; the LM
under ``language_model.``) <-> transformers' InternVL module keys. The sailvl layout shares it."""

INTERNVIT_TOWER = [
    Rule("embeddings.class_embedding", "embeddings.cls_token"),
    Rule("embeddings.position_embedding", "embeddings.position_embeddings"),
    Rule("embeddings.patch_embedding.{w}", "embeddings.patch_embeddings.projection.{w}"),
    Rule("encoder.layers.{i}.ls1", "encoder.layer.{i}.lambda_1"),
    Rule("encoder.layers.{i}.ls2", "encoder.layer.{i}.lambda_2"),
    Rule("encoder.layers.{i}.attn.qkv.{s}", "encoder.layer.{i}.attention.{part}_proj.{s}", "split3"),
    Rule("encoder.layers.{i}.attn.proj.{s}", "encoder.layer.{i}.attention.projection_layer.{s}"),
    Rule("encoder.layers.{i}.attn.q_norm.{s}", "encoder.layer.{i}.attention.q_norm.{s}"),
    Rule("encoder.layers.{i}.attn.k_norm.{s}", "encoder.layer.{i}.attention.k_norm.{s}"),
    Rule("encoder.layers.{i}.mlp.fc1.{s}", "encoder.layer.{i}.mlp.fc1.{s}"),
    Rule("encoder.layers.{i}.mlp.fc2.{s}", "encoder.layer.{i}.mlp.fc2.{s}"),
    Rule("encoder.layers.{i}.norm1.{s}", "encoder.layer.{i}.layernorm_before.{s}"),
    Rule("encoder.layers.{i}.norm2.{s}", "encoder.layer.{i}.layernorm_after.{s}"),
]
"""InternViT's remote-code names (one fused ``attn.qkv``, ``norm1``/``norm2``, ``ls1``/``ls2``)
<-> transformers' InternVLVisionModel names (split q/k/v)."""


def layout_table(tower: list[Rule], layout: str) -> RenameTable:
    """A chat-style container (``vision_model.*``, ``mlp1.*``, ``language_model.*``) with the
    given vision tower <-> transformers InternVL module keys, both directions."""
    return RenameTable(
        CONTAINER + prefixed(tower, _CHAT_VIT, _HF_VIT),
        unknown_a=f"{layout} checkpoint has tensors with no known mapping",
        unknown_b=f"transformers InternVL state dict has tensors with no {layout} mapping",
    )


_CHAT_TABLE = layout_table(INTERNVIT_TOWER, "internvl_chat")


def is_chat_config(config: dict) -> bool:
    """True for an InternVL-chat (SAIL-VL hub) config.json."""
    return config.get("model_type") == CHAT_MODEL_TYPE


def intern_vit_config_to_hf(vis: dict, image: int, patch: int) -> dict:
    """transformers InternVLVisionConfig dict of an InternViT remote-code vision config
    (``model_type`` "intern_vit_6b": inside internvl_chat, or a standalone InternViT folder)."""
    return {
        "model_type": "internvl_vision",
        "hidden_size": vis["hidden_size"],
        "num_hidden_layers": vis["num_hidden_layers"],
        "num_attention_heads": vis["num_attention_heads"],
        "intermediate_size": vis["intermediate_size"],
        "hidden_act": vis.get("hidden_act", "gelu"),
        "image_size": [image, image],
        "patch_size": [patch, patch],
        "num_channels": vis.get("num_channels", 3),
        "attention_bias": bool(vis.get("qkv_bias", False)),
        "use_qk_norm": bool(vis.get("qk_normalization", False)),
        "norm_type": vis.get("norm_type", "rms_norm"),
        "layer_norm_eps": vis.get("layer_norm_eps", 1e-6),
        "layer_scale_init_value": vis.get("initializer_factor", 0.1),
        "use_mean_pooling": True,  # InternViT has no final LayerNorm; mean pooling = no final norm
    }


def chat_config_to_hf(config: dict, image_token_id: int) -> dict:
    """Translate an internvl_chat config.json into transformers' InternVLConfig dict.

    ``image_token_id`` must come from the tokenizer (the chat config does not store it).
    Fails on variants the transformers model cannot express (pixel shuffle v1, LLMs without a
    registered language family).
    """
    if not is_chat_config(config):
        raise ValueError(f"not an {CHAT_MODEL_TYPE} config (model_type={config.get('model_type')!r})")
    vis, llm = config.get("vision_config"), config.get("llm_config")
    if not isinstance(vis, dict) or not isinstance(llm, dict):
        raise ValueError("internvl_chat config needs 'vision_config' and 'llm_config' objects")
    arch = (llm.get("architectures") or [None])[0]
    family = (
        language_family_for_architecture(arch)
        if arch
        else language_family_for_hf(llm.get("model_type", "qwen2"))
    )
    if config.get("ps_version", "v1") != "v2":
        raise ValueError(
            f"ps_version {config.get('ps_version', 'v1')!r}: only pixel shuffle 'v2' is supported"
        )
    image = square_side(config.get("force_image_size") or vis["image_size"])
    patch = square_side(vis["patch_size"])
    ratio = float(config.get("downsample_ratio", 0.5))
    text = {k: v for k, v in llm.items() if k not in LLM_META_KEYS}
    text["model_type"] = family.hf_model_type
    tied = bool(llm.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    text["tie_word_embeddings"] = tied
    vision = intern_vit_config_to_hf(vis, image, patch)
    out = {
        "model_type": "internvl",
        "architectures": ["InternVLForConditionalGeneration"],
        "vision_config": vision,
        "text_config": text,
        "downsample_ratio": ratio,
        "image_token_id": int(image_token_id),
        "image_seq_length": int(round((image // patch) * ratio) ** 2),
        "projector_hidden_act": "gelu",
        "vision_feature_layer": int(config.get("select_layer", -1)),
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": tied,
    }
    dtype = config.get("torch_dtype") or llm.get("torch_dtype")
    if dtype:
        out["dtype"] = dtype
    return out


def hf_config_to_chat(config: dict, template: str = "sailvl-chat", max_tiles: int = 12) -> dict:
    """Translate transformers' InternVLConfig dict into an internvl_chat config.json.

    The image-context token id is kept as ``img_context_token_id`` (an extra field the original
    code ignores) so that a checkpoint without a tokenizer can still be converted back.
    """
    vis, text = config["vision_config"], dict(config["text_config"])
    if not vis.get("use_mean_pooling", True):
        raise ValueError("InternViT has no final LayerNorm: vision_config.use_mean_pooling must be true")
    image, patch = square_side(vis.get("image_size", 448)), square_side(vis.get("patch_size", 14))
    text["architectures"] = [language_family_for_hf(text.get("model_type", "qwen2")).hf_architecture]
    text["tie_word_embeddings"] = bool(
        config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    )
    return {
        "model_type": CHAT_MODEL_TYPE,
        "architectures": ["InternVLChatModel"],
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vis["hidden_size"],
            "num_hidden_layers": vis["num_hidden_layers"],
            "num_attention_heads": vis["num_attention_heads"],
            "intermediate_size": vis["intermediate_size"],
            "hidden_act": vis.get("hidden_act", "gelu"),
            "image_size": image,
            "patch_size": patch,
            "num_channels": vis.get("num_channels", 3),
            "qkv_bias": bool(vis.get("attention_bias", False)),
            "qk_normalization": bool(vis.get("use_qk_norm", False)),
            "norm_type": vis.get("norm_type", "layer_norm"),
            "layer_norm_eps": vis.get("layer_norm_eps", 1e-6),
            "initializer_factor": vis.get("layer_scale_init_value", 0.1),
            "drop_path_rate": 0.0,
            "use_flash_attn": False,
        },
        "llm_config": text,
        "force_image_size": image,
        "downsample_ratio": config.get("downsample_ratio", 0.5),
        "select_layer": config.get("vision_feature_layer", -1),
        "template": template,
        "ps_version": "v2",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": max_tiles,
        "img_context_token_id": config["image_token_id"],
        "tie_word_embeddings": text["tie_word_embeddings"],
    }


def resolve_image_token_id(config: dict, tokenizer_lookup) -> int:
    """Image-context token id of a chat checkpoint: from its tokenizer, else from the config.

    ``tokenizer_lookup(token) -> int | None`` searches the checkpoint's tokenizer files.
    """
    tid = tokenizer_lookup(IMG_CONTEXT)
    if tid is None:
        tid = config.get("img_context_token_id", config.get("image_token_id"))
    if tid is None:
        raise ValueError(
            f"cannot find the id of {IMG_CONTEXT}: no tokenizer file names it and the "
            "config has no img_context_token_id"
        )
    return int(tid)


def chat_to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/split an internvl_chat state dict into InternVLForConditionalGeneration module keys."""
    return _CHAT_TABLE.a_to_b(state)


def hf_to_chat_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``chat_to_hf_state_dict``: module keys -> internvl_chat keys (q/k/v fused)."""
    return _CHAT_TABLE.b_to_a(state)
