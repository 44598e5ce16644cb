"""transformers' InternVL <-> our SailVLModel: configs and full (TP=1, unsharded) state dicts.

Our side uses the local-spec parameter names of ``SailVLModel`` (TE-spec names, where the norm
weights live inside the fused linears, are normalized by ``canonical_key``). The HF side is
``InternVLForConditionalGeneration`` of transformers 5.x (``model.vision_tower``,
``model.multi_modal_projector``, ``model.language_model``, ``lm_head``).

Layout differences handled here:
* Megatron fuses q/k/v into one ``linear_qkv`` whose rows are grouped per KV group:
  [q heads of group 0, k of group 0, v of group 0, q heads of group 1, ...].
* Megatron fuses the SwiGLU gate and up projections into ``linear_fc1`` = [gate; up].
* Tied embeddings: HF may list ``lm_head.weight``; ours has no output weight then.
* ViT layers after ``select_layer`` are not built by us; ``unused_hf_tensors`` picks their HF
  weights out so that conversion can store them beside the Megatron checkpoint and restore them.
"""
from __future__ import annotations

import re

import torch

from megatron_sail.config.model import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig

_V = "model.vision_tower."
_P = "model.multi_modal_projector."
_L = "model.language_model."


# ----------------------------------------------------------------------------- configs
def to_hf_config(cfg: ModelConfig):
    """transformers InternVLConfig (Qwen2 text config) describing the same model."""
    from transformers import InternVLConfig

    v, lm = cfg.vision, cfg.language
    vision = dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
                  num_attention_heads=v.num_heads, intermediate_size=v.ffn_hidden_size,
                  attention_bias=v.qkv_bias, use_qk_norm=v.qk_norm, norm_type=v.norm_type,
                  layer_norm_eps=v.norm_eps, image_size=v.image_size, patch_size=v.patch_size,
                  layer_scale_init_value=v.layer_scale_init, hidden_act="gelu",
                  use_mean_pooling=True)
    text = dict(model_type="qwen2", vocab_size=lm.vocab_size, hidden_size=lm.hidden_size,
                intermediate_size=lm.ffn_hidden_size, num_hidden_layers=lm.num_layers,
                num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
                rms_norm_eps=lm.norm_eps, max_position_embeddings=lm.max_position_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta},
                tie_word_embeddings=lm.tie_embeddings, hidden_act="silu")
    return InternVLConfig(vision_config=vision, text_config=text,
                          image_token_id=cfg.img_context_token_id,
                          downsample_ratio=cfg.projector.downsample_ratio,
                          projector_hidden_act="gelu", vision_feature_layer=v.select_layer,
                          vision_feature_select_strategy="default",
                          tie_word_embeddings=lm.tie_embeddings)


def _rope_theta(text) -> float:
    """RoPE base from a transformers text config (5.x rope_parameters or legacy rope_theta)."""
    params = getattr(text, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(text, "rope_theta", 10000.0))


def _pair(x) -> int:
    """Square side from an int or (h, w); non-square tiles are not supported."""
    if isinstance(x, (list, tuple)):
        if x[0] != x[1]:
            raise ValueError(f"non-square size {tuple(x)} is not supported")
        return int(x[0])
    return int(x)


def from_hf_config(hf, drop_path_rate: float = 0.0) -> ModelConfig:
    """ModelConfig from a transformers InternVLConfig (drop path is not part of HF configs)."""
    v, t = hf.vision_config, hf.text_config
    if getattr(t, "model_type", "qwen2") != "qwen2":
        raise ValueError(f"unsupported text model_type {t.model_type!r} (expected qwen2)")
    if hf.vision_feature_select_strategy != "default":
        raise ValueError("only vision_feature_select_strategy='default' (class token dropped)")
    if not getattr(v, "use_mean_pooling", True):
        raise ValueError("vision configs with a final ViT LayerNorm (use_mean_pooling=False) "
                         "are not supported")
    layer = hf.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer must be one int, got {layer!r}")
    tied = bool(getattr(hf, "tie_word_embeddings", getattr(t, "tie_word_embeddings", False)))
    return ModelConfig(
        vision=VisionConfig(
            hidden_size=v.hidden_size, num_layers=v.num_hidden_layers,
            num_heads=v.num_attention_heads, ffn_hidden_size=v.intermediate_size,
            patch_size=_pair(v.patch_size), image_size=_pair(v.image_size),
            norm_type=v.norm_type, norm_eps=v.layer_norm_eps, qkv_bias=v.attention_bias,
            qk_norm=v.use_qk_norm, layer_scale_init=float(v.layer_scale_init_value),
            drop_path_rate=drop_path_rate, select_layer=layer),
        projector=ProjectorConfig(downsample_ratio=float(hf.downsample_ratio)),
        language=LanguageConfig(
            hidden_size=t.hidden_size, num_layers=t.num_hidden_layers,
            num_heads=t.num_attention_heads, num_kv_heads=t.num_key_value_heads,
            ffn_hidden_size=t.intermediate_size, vocab_size=t.vocab_size,
            norm_eps=t.rms_norm_eps, rope_theta=_rope_theta(t), tie_embeddings=tied,
            max_position_embeddings=t.max_position_embeddings, qkv_bias=True),
        img_context_token_id=hf.image_token_id,
    )


# ----------------------------------------------------------------------------- qkv / fc1 layout
def fuse_qkv(q, k, v, num_heads: int, num_groups: int):
    """Separate q/k/v (weights [out, in] or biases [out]) -> Megatron's grouped linear_qkv."""
    per = num_heads // num_groups
    hd = q.size(0) // num_heads
    tail = q.shape[1:]
    qg = q.reshape(num_groups, per * hd, *tail)
    kg, vg = k.reshape(num_groups, hd, *tail), v.reshape(num_groups, hd, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *tail).contiguous()


def split_qkv(qkv, num_heads: int, num_groups: int):
    """Inverse of ``fuse_qkv``: Megatron linear_qkv -> (q, k, v)."""
    per = num_heads // num_groups
    hd = qkv.size(0) // (num_groups * (per + 2))
    tail = qkv.shape[1:]
    g = qkv.reshape(num_groups, (per + 2) * hd, *tail)
    q, k, v = g.split([per * hd, hd, hd], dim=1)
    return (q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(),
            v.reshape(-1, *tail).contiguous())


def canonical_key(key: str) -> str:
    """Map TE-spec parameter names (norms fused into linears) to local-spec names."""
    for te, local in ((".self_attention.linear_qkv.layer_norm_", ".input_layernorm."),
                      (".mlp.linear_fc1.layer_norm_", ".pre_mlp_layernorm.")):
        if te in key:
            return key.replace(te, local)
    return key


# ----------------------------------------------------------------------------- per-block maps
def _simple_pairs(cfg: ModelConfig):
    """(ours, hf) names that copy one-to-one."""
    pairs = [
        ("vision_model.class_embedding", _V + "embeddings.cls_token"),
        ("vision_model.position_embedding", _V + "embeddings.position_embeddings"),
        ("vision_model.patch_embedding.weight", _V + "embeddings.patch_embeddings.projection.weight"),
        ("vision_model.patch_embedding.bias", _V + "embeddings.patch_embeddings.projection.bias"),
        ("language_model.embedding.word_embeddings.weight", _L + "embed_tokens.weight"),
        ("language_model.decoder.final_layernorm.weight", _L + "norm.weight"),
    ]
    for n in ("layer_norm", "linear_1", "linear_2"):
        pairs += [(f"projector.{n}.{w}", f"{_P}{n}.{w}") for w in ("weight", "bias")]
    if not cfg.language.tie_embeddings:
        pairs.append(("language_model.output_layer.weight", "lm_head.weight"))
    v = cfg.vision
    norm_w = ("weight",) if v.norm_type == "rms_norm" else ("weight", "bias")
    for i in range(v.layers_used):
        o, h = f"vision_model.encoder.layers.{i}.", f"{_V}encoder.layer.{i}."
        pairs += [(o + "ls1", h + "lambda_1"), (o + "ls2", h + "lambda_2")]
        pairs += [(o + f"input_layernorm.{w}", h + f"layernorm_before.{w}") for w in norm_w]
        pairs += [(o + f"pre_mlp_layernorm.{w}", h + f"layernorm_after.{w}") for w in norm_w]
        for w in ("weight", "bias"):
            pairs += [(o + f"self_attention.linear_proj.{w}", h + f"attention.projection_layer.{w}"),
                      (o + f"mlp.linear_fc1.{w}", h + f"mlp.fc1.{w}"),
                      (o + f"mlp.linear_fc2.{w}", h + f"mlp.fc2.{w}")]
        if v.qk_norm:
            pairs += [(o + "self_attention.q_layernorm.weight", h + "attention.q_norm.weight"),
                      (o + "self_attention.k_layernorm.weight", h + "attention.k_norm.weight")]
    for i in range(cfg.language.num_layers):
        o, h = f"language_model.decoder.layers.{i}.", f"{_L}layers.{i}."
        pairs += [(o + "input_layernorm.weight", h + "input_layernorm.weight"),
                  (o + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight"),
                  (o + "self_attention.linear_proj.weight", h + "self_attn.o_proj.weight"),
                  (o + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight")]
    return pairs


def _qkv_sites(cfg: ModelConfig):
    """(ours prefix, hf q/k/v name template, heads, groups, has_bias) for every attention."""
    v, lm = cfg.vision, cfg.language
    for i in range(v.layers_used):
        yield (f"vision_model.encoder.layers.{i}.self_attention.linear_qkv.",
               f"{_V}encoder.layer.{i}.attention.{{}}_proj.", v.num_heads, v.num_heads, v.qkv_bias)
    for i in range(lm.num_layers):
        yield (f"language_model.decoder.layers.{i}.self_attention.linear_qkv.",
               f"{_L}layers.{i}.self_attn.{{}}_proj.", lm.num_heads, lm.num_kv_heads, lm.qkv_bias)


def unused_hf_tensors(hf_sd: dict, cfg: ModelConfig) -> dict:
    """HF tensors our model has no parameter for: the ViT layers after ``select_layer``.

    Anything else left unmapped is an error (a silent drop would make a wrong conversion look
    right); the LM head of a tied checkpoint is the embedding and is simply not needed.
    """
    used = {hf for _, hf in _simple_pairs(cfg)}
    for _, hf, _, _, bias in _qkv_sites(cfg):
        used |= {hf.format(x) + w for x in "qkv" for w in (("weight", "bias") if bias else ("weight",))}
    for i in range(cfg.language.num_layers):
        used |= {f"{_L}layers.{i}.mlp.{n}_proj.weight" for n in ("gate", "up")}
    if cfg.language.tie_embeddings:
        used.add("lm_head.weight")
    later = re.compile(re.escape(_V) + r"encoder\.layer\.(\d+)\.")
    unused, unknown = {}, []
    for key, value in hf_sd.items():
        if key in used:
            continue
        m = later.match(key)
        if m and cfg.vision.layers_used <= int(m.group(1)) < cfg.vision.num_layers:
            unused[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"HF checkpoint has tensors with no place in the model: {sorted(unknown)[:8]}")
    return unused


def _need(sd: dict, key: str, side: str):
    """Fetch a tensor or fail with the missing name."""
    if key not in sd:
        raise KeyError(f"{side} state dict is missing {key!r}")
    return sd[key]


# ----------------------------------------------------------------------------- conversions
def hf_to_ours(hf_sd: dict, cfg: ModelConfig) -> dict:
    """transformers InternVL state dict -> our full TP=1 state dict (tensors only)."""
    out = {ours: _need(hf_sd, hf, "HF") for ours, hf in _simple_pairs(cfg)}
    for ours, hf, heads, groups, bias in _qkv_sites(cfg):
        for w in ("weight", "bias") if bias else ("weight",):
            q, k, v = (_need(hf_sd, hf.format(x) + w, "HF") for x in "qkv")
            out[ours + w] = fuse_qkv(q, k, v, heads, groups)
    for i in range(cfg.language.num_layers):
        h = f"{_L}layers.{i}.mlp."
        out[f"language_model.decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.cat(
            [_need(hf_sd, h + "gate_proj.weight", "HF"), _need(hf_sd, h + "up_proj.weight", "HF")], 0)
    return out


def ours_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    """Our full TP=1 state dict (local or TE names; _extra_state ignored) -> transformers InternVL."""
    sd = {canonical_key(k): v for k, v in sd.items() if not k.endswith("_extra_state")}
    out = {hf: _need(sd, ours, "our") for ours, hf in _simple_pairs(cfg)}
    for ours, hf, heads, groups, bias in _qkv_sites(cfg):
        for w in ("weight", "bias") if bias else ("weight",):
            for name, t in zip("qkv", split_qkv(_need(sd, ours + w, "our"), heads, groups)):
                out[hf.format(name) + w] = t
    for i in range(cfg.language.num_layers):
        gate, up = _need(sd, f"language_model.decoder.layers.{i}.mlp.linear_fc1.weight", "our").chunk(2, 0)
        h = f"{_L}layers.{i}.mlp."
        out[h + "gate_proj.weight"], out[h + "up_proj.weight"] = gate.contiguous(), up.contiguous()
    if cfg.language.tie_embeddings:
        out["lm_head.weight"] = out[_L + "embed_tokens.weight"]
    return out


def load_hf_into(model, hf_sd: dict, cfg: ModelConfig) -> None:
    """Copy an HF state dict into a TP=1, PP=1 SailVLModel; errors on any missing weight."""
    ours = hf_to_ours(hf_sd, cfg)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing={missing[:8]} unexpected={unexpected[:8]}")


# ----------------------------------------------------------------------------- TP/PP slicing
_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")


def _global_key(key: str, model) -> str:
    """Local key of a pipeline stage -> key in the full model (global LM layer numbers)."""
    m = _LAYER.match(key)
    if not m:
        return key
    number = model.language_model.decoder.layers[int(m.group(1))].layer_number - 1
    return f"language_model.decoder.layers.{number}." + key[m.end():]


def shard_for_model(full: dict, model) -> dict:
    """Slice a full TP=1 state dict (ours) down to what ``model`` holds on this TP rank / PP stage.

    Uses each parameter's Megatron TP attributes (``tensor_model_parallel``, ``partition_dim``);
    the LM's fused SwiGLU fc1 is split per half ([gate; up] -> [gate_r; up_r]) like Megatron.
    Also works on gradients stored under the same keys (the distributed tests use it so).
    """
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    cfg = model.model_config
    out = {}
    for key, local in model.state_dict(keep_vars=True).items():
        if key.endswith("_extra_state"):
            continue
        gkey = _global_key(key, model)
        if gkey == "language_model.output_layer.weight" and cfg.language.tie_embeddings:
            gkey = "language_model.embedding.word_embeddings.weight"
        src = _need(full, gkey, "full")
        if tp > 1 and getattr(local, "tensor_model_parallel", False):
            dim = local.partition_dim
            if gkey.startswith("language_model.") and gkey.endswith("mlp.linear_fc1.weight"):
                src = torch.cat([h.chunk(tp, 0)[rank] for h in src.chunk(2, 0)], 0)
            else:
                src = src.chunk(tp, dim)[rank]
        if src.shape != local.shape:
            raise ValueError(f"{key}: full tensor slices to {tuple(src.shape)}, "
                             f"model holds {tuple(local.shape)}")
        out[key] = src.contiguous()
    return out
