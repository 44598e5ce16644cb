"""ProcessorSettings: how images and text became model input at training time.

One record of the tile geometry and chat template that a checkpoint was trained with. It is
written next to every checkpoint as ``processor.json`` (checkpoint/assets.py, hf-to-mcore), read by
generation (inference/) so prompts are built as training built them, and turned into the Hugging
Face processor configs of an export (convert/hf_assets.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from megatron_sail.checkpoint.layout import PROCESSOR_FILE
from megatron_sail.config.data import TemplateConfig


def template_dict(cfg: TemplateConfig) -> dict:
    """TemplateConfig as a JSON-ready dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


@dataclass
class ProcessorSettings:
    """The image/template settings a checkpoint was trained with (``processor.json``)."""

    tile_size: int = 448
    """Tile side in pixels (the ViT input size)."""
    max_tiles: int = 12
    """Most tiles per image at training time (thumbnail not counted; generation may override)."""
    min_tiles: int = 1
    """Fewest tiles per image."""
    use_thumbnail: bool = True
    """Multi-tile images get a whole-image thumbnail tile."""
    tokens_per_tile: int = 256
    """<IMG_CONTEXT> tokens per tile (after pixel shuffle)."""
    template: dict = field(default_factory=lambda: template_dict(TemplateConfig()))
    """TemplateConfig fields (system prompt, separators, caption prompts)."""

    @classmethod
    def from_dict(cls, values: dict, origin: str) -> "ProcessorSettings":
        """Settings from a processor.json-shaped dict; unknown keys are ignored, wrong types
        are an error naming ``origin``."""
        if not isinstance(values, dict):
            raise ValueError(f"{origin}: not a valid {PROCESSOR_FILE} (expected an object)")
        known = {f.name for f in fields(cls)}
        try:
            out = cls(**{k: v for k, v in values.items() if k in known})
        except TypeError as e:
            raise ValueError(f"{origin}: not a valid {PROCESSOR_FILE} ({e})") from e
        for name in ("tile_size", "max_tiles", "min_tiles", "tokens_per_tile"):
            value = getattr(out, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{origin}: {name} must be a positive integer, got {value!r}")
        if not isinstance(out.template, dict):
            raise ValueError(f"{origin}: template must be an object, got {out.template!r}")
        return out

    @classmethod
    def from_meta(cls, meta: dict) -> "ProcessorSettings":
        """The settings a preprocessed dataset was built with (its meta.json)."""
        tiling, tok = meta["tiling"], meta["tokenizer"]
        return cls(
            tile_size=int(tok["tile_size"]),
            max_tiles=int(tiling["max_tiles"]),
            min_tiles=int(tiling["min_tiles"]),
            use_thumbnail=bool(tiling["thumbnail"]),
            tokens_per_tile=int(tok["tokens_per_tile"]),
            template=dict(meta.get("template") or template_dict(TemplateConfig())),
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ProcessorSettings":
        """Load processor.json; a broken or incomplete file is an error naming it."""
        try:
            values = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid {PROCESSOR_FILE} ({e})") from e
        return cls.from_dict(values, str(path))

    def write(self, folder: str | os.PathLike) -> None:
        """Write processor.json into ``folder`` (temporary name, then rename)."""
        path = Path(folder) / PROCESSOR_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def template_config(self) -> TemplateConfig:
        """The TemplateConfig these settings name (unknown template keys are ignored)."""
        known = {f.name for f in fields(TemplateConfig)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.template.items() if k in known}
        return TemplateConfig(**values)
