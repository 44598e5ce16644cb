"""The row schema shared by the dataset reader, the image pipeline and the trainer.

The dataset reader (data/loading/dataset.py) yields one ``PackedRow`` per packed sequence; the image
pipeline turns its ``ImageRecord`` list into tiles; the micro-batch collator stacks rows. Keeping
the schema in one small module lets those parts evolve separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageRecord:
    """One stored image of a packed row, in the order of its <IMG_CONTEXT> run in the row."""

    data: bytes
    """Encoded image bytes as stored (JPEG or PNG)."""
    grid: tuple[int, int]
    """(cols, rows) tile grid chosen at preprocessing time; never recomputed differently."""
    thumbnail: bool
    """Whether a thumbnail tile follows the grid tiles (only when cols*rows > 1)."""
    size: tuple[int, int]
    """Original (width, height) in pixels."""
    sample: int
    """Index, within the row, of the packed sample that holds this image."""
    source: str
    """Where it came from, for warnings: '<dataset prefix>:<image index>'."""

    @property
    def num_tiles(self) -> int:
        """Tiles this image contributes (grid tiles plus the thumbnail, if any)."""
        n = self.grid[0] * self.grid[1]
        return n + 1 if self.thumbnail and n > 1 else n


@dataclass
class PackedRow:
    """One packed training sequence of exactly ``seq_length`` tokens.

    Positions after the last real sample are padding (loss_mask 0). ``cu_seqlens`` holds the
    sample boundaries [0, len0, len0+len1, ..., seq_length]; when there is padding, the padded
    tail is its own final segment so attention over it stays well defined and never reaches a
    real sample.
    """

    tokens: np.ndarray
    """int64 [seq_length] input token ids."""
    labels: np.ndarray
    """int64 [seq_length] next-token targets: labels[t] is the token at t+1 of the same sample
    (the last position of each sample has target 0 and loss_mask 0)."""
    loss_mask: np.ndarray
    """float32 [seq_length]: 1.0 where labels[t] is an assistant (trained) token."""
    cu_seqlens: np.ndarray
    """int32 [segments + 1]: segment boundaries, first 0, last seq_length. They are also the
    positions' only source: RoPE restarts at 0 at each boundary inside the model."""
    num_samples: int
    """Real (non-padding) samples in the row; segments beyond these are padding."""
    images: list[ImageRecord] = field(default_factory=list)
    """Images in <IMG_CONTEXT> order."""
    source_index: int = 0
    """Index of the --data-path prefix the row came from (set by the blend; per-dataset loss)."""
