"""Model-family registry: one spec per vision encoder family and per language family.

Adding a family = one new file here with a ``VisionFamily`` / ``LanguageFamily`` subclass, plus
one line in the table below (see docs/architecture.md, "How to add a family").
"""

from __future__ import annotations

from megatron_sail.config.model import LANGUAGE_FAMILY_NAMES, VISION_FAMILY_CLASS_TOKENS
from megatron_sail.models.families.aimv2 import AIMv2Family
from megatron_sail.models.families.base import KeyMap, LanguageFamily, QKVSite, VisionFamily  # noqa: F401  (re-exported)
from megatron_sail.models.families.internvit import InternViTFamily
from megatron_sail.models.families.qwen2 import Qwen2Family
from megatron_sail.models.families.qwen3 import Qwen3Family
from megatron_sail.models.families.qwen3_moe import Qwen3MoeFamily
from megatron_sail.models.families.siglip import SigLIPFamily

VISION_FAMILIES: dict[str, VisionFamily] = {
    "internvit": InternViTFamily(),
    "aimv2": AIMv2Family(),
    "siglip": SigLIPFamily(),
}
"""Vision encoder families by ``VisionConfig.family``."""

LANGUAGE_FAMILIES: dict[str, LanguageFamily] = {
    "qwen2": Qwen2Family(),
    "qwen3": Qwen3Family(),
    "qwen3_moe": Qwen3MoeFamily(),
}
"""Language model families by ``LanguageConfig.family``."""

if set(VISION_FAMILIES) != set(VISION_FAMILY_CLASS_TOKENS) or set(LANGUAGE_FAMILIES) != set(
    LANGUAGE_FAMILY_NAMES
):
    raise ImportError(
        "models/families and config/model.py name different families: registered "
        f"{sorted(VISION_FAMILIES)} / {sorted(LANGUAGE_FAMILIES)}, config accepts "
        f"{sorted(VISION_FAMILY_CLASS_TOKENS)} / {sorted(LANGUAGE_FAMILY_NAMES)}"
    )
_TOKENS = {name: int(fam.encoder.class_token) for name, fam in VISION_FAMILIES.items()}
if _TOKENS != VISION_FAMILY_CLASS_TOKENS:
    raise ImportError(
        f"class tokens per vision family: the encoder specs say {_TOKENS}, "
        f"config/model.py says {VISION_FAMILY_CLASS_TOKENS}"
    )


def vision_family(name: str) -> VisionFamily:
    """The vision family registered under ``name`` (a clear error for unknown names)."""
    if name not in VISION_FAMILIES:
        raise ValueError(f"unknown vision family {name!r}; known: {sorted(VISION_FAMILIES)}")
    return VISION_FAMILIES[name]


def language_family(name: str) -> LanguageFamily:
    """The language family registered under ``name`` (a clear error for unknown names)."""
    if name not in LANGUAGE_FAMILIES:
        raise ValueError(f"unknown language family {name!r}; known: {sorted(LANGUAGE_FAMILIES)}")
    return LANGUAGE_FAMILIES[name]


def _by(table: dict, attr: str, value: str, what: str):
    """The family whose ``attr`` equals ``value``."""
    for fam in table.values():
        if getattr(fam, attr) == value:
            return fam
    known = sorted(getattr(f, attr) for f in table.values())
    raise ValueError(f"unsupported {what} {value!r}; supported: {known}")


def vision_family_for_hf(model_type: str) -> VisionFamily:
    """The vision family of an HF vision config ``model_type``."""
    return _by(VISION_FAMILIES, "hf_model_type", model_type, "vision model_type")


def language_family_for_hf(model_type: str) -> LanguageFamily:
    """The language family of an HF text config ``model_type``."""
    return _by(LANGUAGE_FAMILIES, "hf_model_type", model_type, "text model_type")


def language_family_for_architecture(arch: str) -> LanguageFamily:
    """The language family of an HF causal-LM class name (internvl_chat ``llm_config``)."""
    return _by(LANGUAGE_FAMILIES, "hf_architecture", arch, "llm_config architecture")
