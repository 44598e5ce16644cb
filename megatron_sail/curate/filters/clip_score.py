"""Optional image-text similarity filter with a CLIP model given by path.

``model`` is either a transformers CLIP folder (config.json + weights + tokenizer; loaded
offline) or, with ``open_clip_model`` set, an open_clip checkpoint file for that architecture
(open_clip is an optional dependency: it needs torchvision, which the CPU test environment
cannot import, so that path is not exercised by the CPU tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_sail.curate.filters.base import FilterSample, FilterStage, Reject

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipScoreConfig:
    """Cosine similarity of CLIP image and caption embeddings, with a floor."""

    enabled: bool = False
    """Off by default: it needs a model."""
    model: Optional[str] = None
    """A transformers CLIP folder, or an open_clip checkpoint file (with open_clip_model)."""
    open_clip_model: Optional[str] = None
    """open_clip architecture name (e.g. ViT-B-32); None: ``model`` is a transformers folder."""
    min_score: float = 0.2
    """Lowest kept cosine similarity."""
    device: str = "cpu"
    """Torch device of the model."""


class ClipScore(FilterStage):
    """Scores one sample at a time (the stage shape); rejects below ``min_score``."""

    name = "clip"

    def __init__(self, cfg: ClipScoreConfig):
        if not cfg.model:
            raise ValueError("clip.model: give the path of a CLIP model (or disable the clip stage)")
        if not os.path.exists(cfg.model):
            raise FileNotFoundError(f"clip.model not found: {cfg.model}")
        self.cfg = cfg
        if cfg.open_clip_model:
            self._load_open_clip()
        else:
            self._load_hf()

    def _load_hf(self) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.model = (
            CLIPModel.from_pretrained(self.cfg.model, local_files_only=True).eval().to(self.cfg.device)
        )
        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model, local_files_only=True)
        self.size = self.model.config.vision_config.image_size
        self.max_len = self.model.config.text_config.max_position_embeddings
        self.kind = "hf"

    def _load_open_clip(self) -> None:
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(
            self.cfg.open_clip_model, pretrained=self.cfg.model
        )
        self.model, self.preprocess = model.eval().to(self.cfg.device), preprocess
        self.tokenizer = open_clip.get_tokenizer(self.cfg.open_clip_model)
        self.kind = "open_clip"

    def _pixels(self, sample: FilterSample):
        """Resize the short side, centre-crop, normalise: CLIP's preprocessing, without torchvision."""
        img = sample.image()
        w, h = img.size
        s = self.size / min(w, h)
        img = img.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), resample=3)
        left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
        arr = np.asarray(img.crop((left, top, left + self.size, top + self.size)), dtype=np.float32) / 255.0
        arr = (arr - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
        import torch

        return torch.from_numpy(arr).permute(2, 0, 1)[None]

    def score(self, sample: FilterSample) -> float:
        """Cosine similarity between the image and its caption."""
        import torch

        with torch.no_grad():
            return self._score(sample, torch)

    def _score(self, sample: FilterSample, torch) -> float:
        if self.kind == "open_clip":
            img = self.model.encode_image(self.preprocess(sample.image())[None].to(self.cfg.device))
            txt = self.model.encode_text(self.tokenizer([sample.caption or ""]).to(self.cfg.device))
        else:
            tok = self.tokenizer(
                [sample.caption or ""], return_tensors="pt", truncation=True, max_length=self.max_len
            )
            img = self.model.get_image_features(pixel_values=self._pixels(sample).to(self.cfg.device))
            txt = self.model.get_text_features(
                **{k: v.to(self.cfg.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            )
            img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
        return float(torch.nn.functional.cosine_similarity(img.float(), txt.float()).item())

    def process(self, sample: FilterSample) -> Optional[Reject]:
        s = self.score(sample)
        sample.scores["clip_score"] = s
        if s < self.cfg.min_score:
            return Reject("clip_score", f"{s:.3f} < {self.cfg.min_score}")
        return None
