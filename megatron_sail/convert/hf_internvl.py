"""transformers' InternVL <-> our SailVLModel: configs and full (TP=1, unsharded) state dicts.

The InternVL container (vision tower, projector, text model, LM head) lives here; what is inside
the vision tower and the text model comes from the family specs (``models/families``: their HF
configs and ``KeyMap``s). This file names no family.

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
from collections.abc import Mapping

import torch

from megatron_sail.config.model import ModelConfig, ProjectorConfig
from megatron_sail.models.families import (
    KeyMap,
    language_family,
    language_family_for_hf,
    vision_family,
    vision_family_for_hf,
)

_V = "model.vision_tower."
_P = "model.multi_modal_projector."
_L = "model.language_model."


# ----------------------------------------------------------------------------- configs
def to_hf_config(cfg: ModelConfig):
    """transformers InternVLConfig describing the same model (vision/text configs from the families)."""
    from transformers import InternVLConfig

    v, lm = cfg.vision, cfg.language
    if not vision_family(v.family).in_internvl_container:
        raise ValueError(
            f"transformers' InternVL cannot hold a {v.family!r} vision tower: "
            "convert that encoder alone (families key_map / apply_key_map)"
        )
    if cfg.geometry().padded:
        raise ValueError(
            "transformers' InternVL pixel shuffle cannot express projector."
            "odd_grid='pad' (the zero-padded odd patch grid)"
        )
    return InternVLConfig(
        vision_config=vision_family(v.family).hf_config(v),
        text_config=language_family(lm.family).hf_config(lm),
        image_token_id=cfg.img_context_token_id,
        downsample_ratio=cfg.projector.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=v.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=lm.tie_embeddings,
    )


def from_hf_config(hf, drop_path_rate: float = 0.0) -> ModelConfig:
    """ModelConfig from a transformers InternVLConfig (drop path is not part of HF configs).

    The families are chosen by the vision and text configs' ``model_type``."""
    v, t = hf.vision_config, hf.text_config
    text_family = language_family_for_hf(getattr(t, "model_type", "qwen2"))
    vis_family = vision_family_for_hf(getattr(v, "model_type", "internvl_vision"))
    if hf.vision_feature_select_strategy != "default":
        raise ValueError("only vision_feature_select_strategy='default' (class token dropped)")
    layer = hf.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer must be one int, got {layer!r}")
    tied = bool(getattr(hf, "tie_word_embeddings", getattr(t, "tie_word_embeddings", False)))
    return ModelConfig(
        vision=vis_family.from_hf_config(v, select_layer=layer, drop_path_rate=drop_path_rate),
        projector=ProjectorConfig(downsample_ratio=float(hf.downsample_ratio)),
        language=text_family.from_hf_config(t, tied=tied),
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
    return (
        q.reshape(-1, *tail).contiguous(),
        k.reshape(-1, *tail).contiguous(),
        v.reshape(-1, *tail).contiguous(),
    )


def canonical_key(key: str) -> str:
    """Map TE-spec parameter names (norms fused into linears) to local-spec names."""
    for te, local in (
        (".self_attention.linear_qkv.layer_norm_", ".input_layernorm."),
        (".mlp.linear_fc1.layer_norm_", ".pre_mlp_layernorm."),
    ):
        if te in key:
            return key.replace(te, local)
    return key


# ----------------------------------------------------------------------------- key maps
def key_map(cfg: ModelConfig) -> KeyMap:
    """The whole model's map: the vision and language families' maps plus the projector."""
    v, lm = cfg.vision, cfg.language
    km = vision_family(v.family).key_map(v, "vision_model.", _V)
    km.copies += [
        (f"projector.{n}.{w}", f"{_P}{n}.{w}")
        for n in ("layer_norm", "linear_1", "linear_2")
        for w in ("weight", "bias")
    ]
    km += language_family(lm.family).key_map(lm, "language_model.", _L, "lm_head.weight")
    return km


def unused_hf_tensors(hf_sd: dict, cfg: ModelConfig) -> dict:
    """HF tensors our model has no parameter for: those the vision family does not build (the
    ViT layers after ``select_layer``).

    Anything else left unmapped is an error (a silent drop would make a wrong conversion look
    right); the LM head of a tied checkpoint is the embedding and is simply not needed.
    """
    used = key_map(cfg).hf_names()
    fam = vision_family(cfg.vision.family)
    unused, unknown = {}, []
    for key, value in hf_sd.items():
        if key in used:
            continue
        if fam.unused_hf(cfg.vision, _V, key):
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
def _weights(site) -> tuple[str, ...]:
    """Parameter suffixes of a q/k/v site."""
    return ("weight", "bias") if site.bias else ("weight",)


def hf_to_ours(hf_sd: dict, cfg: ModelConfig) -> dict:
    """transformers InternVL state dict -> our full TP=1 state dict (tensors only)."""
    return apply_key_map(key_map(cfg), hf_sd)


def apply_key_map(km: KeyMap, hf_sd: dict) -> dict:
    """HF tensors -> ours through one key map (a whole model's, or one family's part)."""
    out = {ours: _need(hf_sd, hf, "HF") for ours, hf in km.copies}
    for site in km.qkv:
        for w in _weights(site):
            q, k, v = (_need(hf_sd, site.hf.format(x) + w, "HF") for x in "qkv")
            out[site.ours + w] = fuse_qkv(q, k, v, site.heads, site.groups)
    for ours, parts in km.concat:
        out[ours] = torch.cat([_need(hf_sd, p, "HF") for p in parts], 0)
    return out


class LazyOurs(Mapping):
    """``hf_to_ours`` computed one key at a time: fused q/k/v and concatenations exist only
    while the caller holds them (a streaming load copies each into the model and drops it).

    ``sources(key)`` names the HF tensors a key is made from, so the caller can release them."""

    def __init__(self, hf_sd: dict, cfg: ModelConfig):
        self.hf_sd = hf_sd
        self._make: dict[str, tuple] = {}
        km = key_map(cfg)
        for ours, hf in km.copies:
            self._make[ours] = ("copy", (hf,))
        for site in km.qkv:
            for w in _weights(site):
                names = tuple(site.hf.format(x) + w for x in "qkv")
                self._make[site.ours + w] = ("qkv", names, site.heads, site.groups)
        for ours, parts in km.concat:
            self._make[ours] = ("cat", tuple(parts))

    def sources(self, key: str) -> list:
        """The HF tensors ``key`` is built from."""
        return [self.hf_sd[n] for n in self._make[key][1] if n in self.hf_sd]

    def __getitem__(self, key: str):
        kind, names, *rest = self._make[key]
        parts = [_need(self.hf_sd, n, "HF") for n in names]
        if kind == "copy":
            return parts[0]
        if kind == "qkv":
            return fuse_qkv(*parts, *rest)
        return torch.cat(parts, 0)

    def fill(self, key: str, dest: torch.Tensor) -> bool:
        """Write the full tensor ``key`` straight into ``dest`` (same shape), part by part, so no
        fused or concatenated copy is ever made; a plain copy whose source already has
        ``dest``'s dtype and device is not copied at all: ``dest`` becomes a view of it (the
        file pages are read when first used, as transformers' loading does). True if ``dest``
        now shares the source's memory."""
        kind, names, *rest = self._make[key]
        parts = [_need(self.hf_sd, n, "HF") for n in names]
        if kind == "copy":
            src = parts[0]
            if src.shape != dest.shape:
                raise ValueError(
                    f"{key}: HF tensor {names[0]} has shape {tuple(src.shape)}, "
                    f"the model holds {tuple(dest.shape)}"
                )
            if src.dtype == dest.dtype and src.device == dest.device and src.is_contiguous():
                dest.data = src
                return True
            dest.copy_(src)
            return False
        if kind == "qkv":
            heads, groups = rest
            q, k, v = parts
            per, hd, tail = heads // groups, q.size(0) // heads, q.shape[1:]
            grouped = dest.view(groups, per + 2, hd, *tail)
            grouped[:, :per].copy_(q.reshape(groups, per, hd, *tail))
            grouped[:, per].copy_(k.reshape(groups, hd, *tail))
            grouped[:, per + 1].copy_(v.reshape(groups, hd, *tail))
            return False
        start = 0
        for part in parts:
            dest[start : start + part.size(0)].copy_(part)
            start += part.size(0)
        if start != dest.size(0):
            raise ValueError(f"{key}: HF parts {list(names)} hold {start} rows, the model {dest.size(0)}")
        return False

    def __contains__(self, key) -> bool:
        return key in self._make

    def __iter__(self):
        return iter(self._make)

    def __len__(self) -> int:
        return len(self._make)


def ours_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    """Our full TP=1 state dict (local or TE names; _extra_state ignored) -> transformers InternVL."""
    sd = {canonical_key(k): v for k, v in sd.items() if not k.endswith("_extra_state")}
    km = key_map(cfg)
    out = {hf: _need(sd, ours, "our") for ours, hf in km.copies}
    for site in km.qkv:
        for w in _weights(site):
            for name, t in zip("qkv", split_qkv(_need(sd, site.ours + w, "our"), site.heads, site.groups)):
                out[site.hf.format(name) + w] = t
    for ours, parts in km.concat:
        for p, t in zip(parts, _need(sd, ours, "our").chunk(len(parts), 0)):
            out[p] = t.contiguous()
    for hf, source in km.aliases:
        out[hf] = out[source]
    return out


def to_transformers_params(hf_sd: dict, cfg: ModelConfig) -> dict:
    """Checkpoint tensors (module-prefixed names as read from safetensors) -> the state dict
    ``InternVLForConditionalGeneration.load_state_dict`` takes (fused experts, for example)."""
    return language_family(cfg.language.family).to_transformers_params(cfg.language, hf_sd, _L)


def from_transformers_params(sd: dict, cfg: ModelConfig) -> dict:
    """``InternVLForConditionalGeneration.state_dict()`` -> the tensors ``save_pretrained``
    writes (module-prefixed names), which the key map and the converters use."""
    return language_family(cfg.language.family).from_transformers_params(cfg.language, sd, _L)


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
    return f"language_model.decoder.layers.{number}." + key[m.end() :]


def shard_for_model(full: dict, model) -> dict:
    """Slice a full TP=1 state dict (ours) down to what ``model`` holds on this TP rank / PP stage.

    Uses each parameter's Megatron TP attributes (``tensor_model_parallel``, ``partition_dim``);
    a fused SwiGLU fc1 (a two-part concat in the key map) is split per half ([gate; up] ->
    [gate_r; up_r]) like Megatron.
    Also works on gradients stored under the same keys (the distributed tests use it so).
    """
    return {key: value for key, value, _ in iter_shards(full, model)}


def global_keys(model):
    """(local key, tensor, full-model key) of every entry of ``model``'s state dict but
    ``_extra_state``; a tied output layer names the embedding it shares."""
    cfg = model.model_config
    for key, local in model.state_dict(keep_vars=True).items():
        if key.endswith("_extra_state"):
            continue
        gkey = _global_key(key, model)
        if gkey == "language_model.output_layer.weight" and cfg.language.tie_embeddings:
            gkey = "language_model.embedding.word_embeddings.weight"
        yield key, local, gkey


def iter_shards(full, model):
    """``shard_for_model`` one tensor at a time: (key, this rank's slice, full-tensor key) per
    entry of the model's state dict, in order; ``full`` may be a LazyOurs."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    halves = {
        ours for ours, parts in key_map(model.model_config).concat if len(parts) == 2
    }  # SwiGLU [gate; up]
    for key, local, gkey in global_keys(model):
        src = _need(full, gkey, "full")
        if tp > 1 and getattr(local, "tensor_model_parallel", False):
            dim = local.partition_dim
            if gkey in halves:
                src = torch.cat([h.chunk(tp, 0)[rank] for h in src.chunk(2, 0)], 0)
            else:
                src = src.chunk(tp, dim)[rank]
        if src.shape != local.shape:
            raise ValueError(
                f"{key}: full tensor slices to {tuple(src.shape)}, model holds {tuple(local.shape)}"
            )
        yield key, src.contiguous(), gkey
