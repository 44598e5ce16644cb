"""What a model family is: the contract every vision-encoder and language-model spec fulfils.

A family bundles, in one place (in the spirit of torchtitan's ``ModelSpec``), everything the rest
of the code needs to know about one architecture:

* build: a vision family's ``encoder`` (an ``EncoderSpec``: which parts models/vit.py's one
  ``ViTEncoder`` is made of); a language family's config -> Megatron-Core ``TransformerConfig``,
* FLOPs: the dimensions ``training/flops.py`` counts with,
* Hugging Face mapping: the HF config fields and a ``KeyMap`` (renames plus the tensor transforms
  q/k/v fusion and gate/up concatenation) from our parameter names to the HF ones,
* the encoder's FLOPs fields given its token geometry (``config.model.TokenGeometry``: patch
  grid, class tokens, merge, tokens per tile; the class tokens per family are config data).

``SailVLModel``, the FLOPs count, the converters and the data checks call these methods through
the registry (``families/__init__.py``); none of them names a family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from megatron_sail.config.model import TokenGeometry
from megatron_sail.models.encoder_spec import EncoderSpec


def square_side(size) -> int:
    """Side of a square image or patch from an int or an (h, w) pair, as HF configs spell
    them; non-square sizes are refused (tiles are square)."""
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square size {tuple(size)} is not supported")
        return int(size[0])
    return int(size)


@dataclass(frozen=True)
class QKVSite:
    """One attention whose q/k/v HF tensors fuse into Megatron's grouped ``linear_qkv``."""

    ours: str
    """Our parameter prefix, ending in '.' (``...self_attention.linear_qkv.``)."""
    hf: str
    """HF name template with ``{}`` for q/k/v (``...self_attn.{}_proj.``)."""
    heads: int
    """Query heads."""
    groups: int
    """Key/value heads (query groups)."""
    bias: bool
    """Whether the projections carry a bias."""


@dataclass
class KeyMap:
    """Our full (TP=1) parameter names <-> HF names, with the transforms between them."""

    copies: list[tuple[str, str]] = field(default_factory=list)
    """(ours, hf) tensors copied unchanged."""
    qkv: list[QKVSite] = field(default_factory=list)
    """Attentions whose q/k/v are fused on our side."""
    concat: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    """(ours, (hf parts...)): our tensor is the HF parts concatenated on dim 0 (SwiGLU [gate; up])."""
    aliases: list[tuple[str, str]] = field(default_factory=list)
    """(hf, hf source): HF tensors that are another HF tensor (a tied LM head), written on export
    and accepted (not needed) on import."""

    def __iadd__(self, other: "KeyMap") -> "KeyMap":
        self.copies += other.copies
        self.qkv += other.qkv
        self.concat += other.concat
        self.aliases += other.aliases
        return self

    def hf_names(self) -> set[str]:
        """Every HF tensor name this map reads or writes."""
        names = {hf for _, hf in self.copies} | {hf for hf, _ in self.aliases}
        for s in self.qkv:
            names |= {
                s.hf.format(x) + w for x in "qkv" for w in (("weight", "bias") if s.bias else ("weight",))
            }
        for _, parts in self.concat:
            names |= set(parts)
        return names


class VisionFamily:
    """A vision encoder family: mostly data (names, ``encoder`` parts); subclasses fill the HF
    side (configs, key map). Instances are stateless."""

    name: str = ""
    """Registry name, the value of ``VisionConfig.family``."""
    hf_model_type: str = ""
    """``model_type`` of the family's HF vision config."""
    in_internvl_container: bool = True
    """Whether transformers' InternVLForConditionalGeneration can hold this encoder (else the
    HF side is the encoder alone)."""
    vlm_export: bool = True
    """Whether some HF VLM layout (InternVL's ``hf``, or a ``chat`` remote-code layout) can hold
    the whole model with this encoder (else only the encoder converts alone)."""
    encoder: EncoderSpec = EncoderSpec()
    """The parts and layer settings of the family's ``ViTEncoder``."""
    hf_layers: str = "encoder.layers"
    """Prefix of the HF layers (under the encoder's prefix): ``<hf_layers>.<i>.``."""
    hf_final_norm: tuple[str, ...] = ()
    """Prefixes of the HF final norm, built only when the last layer is selected."""
    hf_never_built: tuple[str, ...] = ()
    """Prefixes of HF tensors that are not part of a VLM encoder (a pooling head)."""

    def flops_fields(self, vision, geometry: TokenGeometry) -> dict:
        """The ``FlopsShape`` fields of the encoder (vit_*, patch_dim): class tokens run
        through every layer; a gated MLP has three matrices."""
        return dict(
            vit_hidden=vision.hidden_size,
            vit_layers=vision.layers_used,
            vit_ffn=vision.ffn_hidden_size,
            vit_tokens_per_tile=geometry.encoder_tokens,
            vit_class_tokens=geometry.class_tokens,
            patch_dim=3 * vision.patch_size * vision.patch_size,
            vit_gated_mlp=self.encoder.gated_mlp,
        )

    def hf_config(self, vision) -> dict:
        """The family's HF vision config as a dict (with model_type)."""
        raise NotImplementedError

    def from_hf_config(self, hf_vision, select_layer: int, drop_path_rate: float = 0.0):
        """VisionConfig from the HF vision config object."""
        raise NotImplementedError

    def vision_config(self, v, select_layer: int, drop_path_rate: float, **fields):
        """VisionConfig of an HF vision config: the widths and sizes every family spells the
        same way (hidden_size, num_hidden_layers, ...), plus the family's ``fields``."""
        from megatron_sail.config.model import VisionConfig

        return VisionConfig(
            family=self.name,
            hidden_size=v.hidden_size,
            num_layers=v.num_hidden_layers,
            num_heads=v.num_attention_heads,
            ffn_hidden_size=v.intermediate_size,
            patch_size=square_side(v.patch_size),
            image_size=square_side(v.image_size),
            drop_path_rate=drop_path_rate,
            select_layer=select_layer,
            **fields,
        )

    def key_map(self, vision, ours: str, hf: str) -> KeyMap:
        """Parameter map of the encoder; ``ours`` / ``hf`` are the module prefixes."""
        raise NotImplementedError

    def unused_hf(self, vision, hf: str, key: str) -> bool:
        """Whether an HF tensor is a weight we deliberately do not build: layers after
        ``select_layer``, the final norm they would feed, parts never built (``hf_never_built``)."""
        if key.startswith(tuple(hf + p for p in self.hf_never_built)):
            return True
        m = re.match(re.escape(hf + self.hf_layers) + r"\.(\d+)\.", key)
        if m:
            return vision.layers_used <= int(m.group(1)) < vision.num_layers
        cut = vision.layers_used < vision.num_layers
        return cut and key.startswith(tuple(hf + p for p in self.hf_final_norm))


class LanguageFamily:
    """A decoder LM family. Subclasses fill every method; instances are stateless."""

    name: str = ""
    """Registry name, the value of ``LanguageConfig.family``."""
    hf_model_type: str = ""
    """``model_type`` of the family's HF text config."""
    hf_architecture: str = ""
    """HF causal-LM class name (``llm_config.architectures`` in internvl_chat checkpoints)."""

    def transformer_config(self, lm, parallel, dtype):
        """Megatron TransformerConfig of the decoder under the parallel layout."""
        raise NotImplementedError

    def flops_fields(self, lm) -> dict:
        """The ``FlopsShape`` fields of the decoder (lm_*, vocab_size)."""
        raise NotImplementedError

    def hf_config(self, lm) -> dict:
        """The family's HF text config as a dict (with model_type)."""
        raise NotImplementedError

    def from_hf_config(self, text, tied: bool):
        """LanguageConfig from the HF text config object."""
        raise NotImplementedError

    def key_map(self, lm, ours: str, hf: str, hf_head: str) -> KeyMap:
        """Parameter map of the decoder; ``hf_head`` is the HF name of the output layer."""
        raise NotImplementedError

    def to_transformers_params(self, lm, state: dict, hf: str) -> dict:
        """Checkpoint tensors (the names ``save_pretrained`` writes, which ``key_map`` uses) ->
        the parameters transformers' module holds in memory, for ``load_state_dict``; ``hf`` is
        the text model's prefix. The same names for most families (identity)."""
        return state

    def from_transformers_params(self, lm, state: dict, hf: str) -> dict:
        """Inverse of ``to_transformers_params``: a transformers module's ``state_dict()`` ->
        the tensors its ``save_pretrained`` writes."""
        return state
