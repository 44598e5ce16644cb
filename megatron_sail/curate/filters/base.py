"""What every filter stage sees (a sample) and returns (None to keep, or a Reject)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Optional

from PIL import Image


@dataclass(frozen=True)
class Reject:
    """Why a sample was removed: a short machine-readable reason and a human detail."""

    reason: str
    """Counted in the report (e.g. ``near_duplicate``)."""
    detail: str = ""
    """What was measured (e.g. ``hamming 2 to shard-0/000012``)."""


@dataclass
class FilterSample:
    """One WebDataset sample: every member as read (written out unchanged) plus what the
    stages derive from it (decoded image, scores)."""

    key: str
    """WebDataset key (the member name up to its first dot)."""
    shard: str
    """Input shard name, for rejects and duplicate details."""
    members: dict = field(default_factory=dict)
    """Suffix (``jpg``, ``txt``, ``original.txt``, ``json``) -> bytes, in tar order."""
    image_ext: Optional[str] = None
    """The suffix holding the image, if any."""
    caption: Optional[str] = None
    """The caption the filters judge (``txt``, else ``caption``)."""
    scores: dict = field(default_factory=dict)
    """Per-stage measurements, for the report's histograms."""
    record: dict = field(default_factory=dict)
    """Fields a stage adds to the kept sample's ``json`` member (the judge's scores), so later
    tools (data_ablation, SFT complexity) can read them."""
    _image: Optional[Image.Image] = None

    @property
    def where(self) -> str:
        return f"{self.shard}/{self.key}"

    @property
    def image_bytes(self) -> Optional[bytes]:
        return self.members.get(self.image_ext) if self.image_ext else None

    def image(self) -> Image.Image:
        """The decoded RGB image (decoded once; the image check stage decodes it first)."""
        if self._image is None:
            img = Image.open(io.BytesIO(self.image_bytes))
            img.load()
            self._image = img.convert("RGB")
        return self._image


class FilterStage:
    """Base of the stages: ``name`` (the config section) and ``process``."""

    name = "stage"

    def process(self, sample: FilterSample) -> Optional[Reject]:
        """None keeps the sample; a Reject removes it."""
        raise NotImplementedError
