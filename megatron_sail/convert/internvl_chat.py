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

import re

import torch

from megatron_sail.models.families import language_family_for_architecture, language_family_for_hf

IMG_CONTEXT = "<IMG_CONTEXT>"
"""The token whose embeddings are replaced by visual tokens (InternVL's name)."""

CHAT_MODEL_TYPE = "internvl_chat"

_LLM_META_KEYS = ("architectures", "auto_map", "_name_or_path", "transformers_version",
                  "torch_dtype", "dtype", "attn_implementation", "_attn_implementation")

# Vision per-layer renames: InternViT name -> transformers InternVLVisionLayer name (qkv handled apart).
_LAYER_RENAMES = {
    "attn.proj": "attention.projection_layer",
    "attn.q_norm": "attention.q_norm",
    "attn.k_norm": "attention.k_norm",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
}
_LAYER_PARAMS = {"ls1": "lambda_1", "ls2": "lambda_2"}
_EMBED_RENAMES = {
    "embeddings.class_embedding": "embeddings.cls_token",
    "embeddings.position_embedding": "embeddings.position_embeddings",
    "embeddings.patch_embedding.weight": "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embedding.bias": "embeddings.patch_embeddings.projection.bias",
}
_PROJ_RENAMES = {"mlp1.0.": "layer_norm.", "mlp1.1.": "linear_1.", "mlp1.3.": "linear_2."}

_CHAT_VIT = "vision_model."
_HF_VIT = "model.vision_tower."
_HF_PROJ = "model.multi_modal_projector."
_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)$")
# The same tables read backwards (transformers names -> chat names), built once.
_EMBED_FROM_HF = {v: k for k, v in _EMBED_RENAMES.items()}
_LAYER_PARAMS_FROM_HF = {v: k for k, v in _LAYER_PARAMS.items()}
_LAYER_FROM_HF = {v: k for k, v in _LAYER_RENAMES.items()}
_PROJ_FROM_HF = {v: k for k, v in _PROJ_RENAMES.items()}


def is_chat_config(config: dict) -> bool:
    """True for an InternVL-chat (SAIL-VL hub) config.json."""
    return config.get("model_type") == CHAT_MODEL_TYPE


def _size(value) -> int:
    """Square image/patch size from an int or a [h, w] pair (non-square is not supported)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square size {value} is not supported")
        return int(value[0])
    return int(value)


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
    family = (language_family_for_architecture(arch) if arch else
              language_family_for_hf(llm.get("model_type", "qwen2")))
    if config.get("ps_version", "v1") != "v2":
        raise ValueError(f"ps_version {config.get('ps_version', 'v1')!r}: only pixel shuffle 'v2' is supported")
    image = _size(config.get("force_image_size") or vis["image_size"])
    patch = _size(vis["patch_size"])
    ratio = float(config.get("downsample_ratio", 0.5))
    text = {k: v for k, v in llm.items() if k not in _LLM_META_KEYS}
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
    image, patch = _size(vis.get("image_size", 448)), _size(vis.get("patch_size", 14))
    text["architectures"] = [language_family_for_hf(text.get("model_type", "qwen2")).hf_architecture]
    text["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
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
        raise ValueError(f"cannot find the id of {IMG_CONTEXT}: no tokenizer file names it and the "
                         "config has no img_context_token_id")
    return int(tid)


def _vision_chat_to_hf(name: str, value: torch.Tensor, out: dict) -> bool:
    """Map one ``vision_model.*`` tensor (name without prefix) into ``out``; False if unknown."""
    if name in _EMBED_RENAMES:
        out[_HF_VIT + _EMBED_RENAMES[name]] = value
        return True
    m = _LAYER_RE.match(name)
    if not m:
        return False
    layer, rest = m.groups()
    base = f"{_HF_VIT}encoder.layer.{layer}."
    if rest in _LAYER_PARAMS:
        out[base + _LAYER_PARAMS[rest]] = value
        return True
    if rest.startswith("attn.qkv."):
        suffix = rest[len("attn.qkv."):]
        if value.shape[0] % 3:
            raise ValueError(f"vision_model.{name}: fused qkv first dim {value.shape[0]} is not divisible by 3")
        for part, chunk in zip("qkv", value.chunk(3, dim=0)):
            out[f"{base}attention.{part}_proj.{suffix}"] = chunk.clone()
        return True
    module, _, suffix = rest.rpartition(".")
    if module in _LAYER_RENAMES:
        out[f"{base}{_LAYER_RENAMES[module]}.{suffix}"] = value
        return True
    return False


def container_to_hf(state: dict[str, torch.Tensor], vision_to_hf, layout: str
                    ) -> dict[str, torch.Tensor]:
    """A chat-style container (``vision_model.*``, ``mlp1.*``, ``language_model.*``) ->
    transformers InternVL module keys, the vision tower mapped by ``vision_to_hf(name, value,
    out)``. Every input tensor must be accounted for; unknown keys are an error (a silent drop
    would make a wrong conversion look right). Shared by the InternVL-chat and sailvl layouts."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        ok = True
        if key.startswith(_CHAT_VIT):
            ok = vision_to_hf(key[len(_CHAT_VIT):], value, out)
        elif key.startswith("mlp1."):
            prefix = next((p for p in _PROJ_RENAMES if key.startswith(p)), None)
            ok = prefix is not None
            if ok:
                out[_HF_PROJ + _PROJ_RENAMES[prefix] + key[len(prefix):]] = value
        elif key.startswith("language_model.model."):
            out["model.language_model." + key[len("language_model.model."):]] = value
        elif key == "language_model.lm_head.weight":
            out["lm_head.weight"] = value
        else:
            ok = False
        if not ok:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{layout} checkpoint has tensors with no known mapping: {sorted(unknown)[:8]}")
    return out


def chat_to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/split an internvl_chat state dict into InternVLForConditionalGeneration module keys."""
    return container_to_hf(state, _vision_chat_to_hf, "internvl_chat")


def _vision_hf_to_chat(name: str, value: torch.Tensor, out: dict, pending: dict) -> bool:
    """Map one ``model.vision_tower.*`` tensor back; q/k/v parts wait in ``pending`` to be fused."""
    if name in _EMBED_FROM_HF:
        out[_CHAT_VIT + _EMBED_FROM_HF[name]] = value
        return True
    m = _HF_LAYER_RE.match(name)
    if not m:
        return False
    layer, rest = m.groups()
    base = f"{_CHAT_VIT}encoder.layers.{layer}."
    if rest in _LAYER_PARAMS_FROM_HF:
        out[base + _LAYER_PARAMS_FROM_HF[rest]] = value
        return True
    qkv = re.match(r"attention\.([qkv])_proj\.(weight|bias)$", rest)
    if qkv:
        pending.setdefault(f"{base}attn.qkv.{qkv.group(2)}", {})[qkv.group(1)] = value
        return True
    module, _, suffix = rest.rpartition(".")
    if module in _LAYER_FROM_HF:
        out[f"{base}{_LAYER_FROM_HF[module]}.{suffix}"] = value
        return True
    return False


def container_from_hf(state: dict[str, torch.Tensor], vision_from_hf, layout: str
                      ) -> dict[str, torch.Tensor]:
    """transformers InternVL module keys -> a chat-style container (``vision_model.*``, ``mlp1.*``,
    ``language_model.*``), the vision tower mapped by ``vision_from_hf(name, value, out,
    pending)``, which parks q/k/v in ``pending`` to be fused here. Shared by the InternVL-chat
    and sailvl layouts, which differ only in their tower's names."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        ok = True
        if key.startswith(_HF_VIT):
            ok = vision_from_hf(key[len(_HF_VIT):], value, out, pending)
        elif key.startswith(_HF_PROJ):
            rest = key[len(_HF_PROJ):]
            prefix = next((p for p in _PROJ_FROM_HF if rest.startswith(p)), None)
            ok = prefix is not None
            if ok:
                out[_PROJ_FROM_HF[prefix] + rest[len(prefix):]] = value
        elif key.startswith("model.language_model."):
            out["language_model.model." + key[len("model.language_model."):]] = value
        elif key == "lm_head.weight":
            out["language_model.lm_head.weight"] = value
        else:
            ok = False
        if not ok:
            unknown.append(key)
    if unknown:
        raise ValueError(f"transformers InternVL state dict has tensors with no {layout} mapping: "
                         f"{sorted(unknown)[:8]}")
    for key, parts in pending.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{key}: needs q, k and v projections, got {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def hf_to_chat_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``chat_to_hf_state_dict``: module keys -> internvl_chat keys (q/k/v fused)."""
    return container_from_hf(state, _vision_hf_to_chat, "chat")
