"""The one image-pipeline interface (the choice of backend is backend.py).

Every backend only decodes and resizes (the part that differs: PIL on CPU, DALI on CPU or GPU);
cutting the resized image into row-major tiles, appending the thumbnail and normalizing is shared
here, so all backends lay tiles out identically and normalize with the same float operations as
InternVL's ToTensor + Normalize.
"""

from __future__ import annotations

import logging
import threading
from typing import Sequence

import torch

from megatron_sail.config.images import ImageConfig
from megatron_sail.data.images.imageinfo import header_size
from megatron_sail.data.records import ImageRecord

logger = logging.getLogger(__name__)


class ImagePipeline:
    """Turns a list of ImageRecords into one float32 tile tensor, in record order.

    Subclasses implement ``_decode_into``. A failed image gets blank tiles: zeros after
    normalization, i.e. every pixel equal to the normalization mean. ``failures`` counts failed
    images over the pipeline's life.
    """

    backend = "base"
    """Name of the backend, as accepted by ImageConfig.backend."""

    def __init__(self, cfg: ImageConfig, device: torch.device = torch.device("cpu")) -> None:
        self.cfg = cfg
        self.device = device
        self.failures = 0
        self._lock = threading.Lock()  # training and validation loaders may share one pipeline
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32, device=device).view(3, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32, device=device).view(3, 1, 1)

    def tiles(self, records: Sequence[ImageRecord]) -> tuple[torch.Tensor, list[bool]]:
        """Return (tiles [n_tiles, 3, S, S] float32, ok per image); tiles follow record order."""
        S = self.cfg.tile_size
        for rec in records:
            _check_record(rec)
        offsets = [0]
        for rec in records:
            offsets.append(offsets[-1] + rec.num_tiles)
        pin = self.cfg.pin_memory and self.device.type == "cpu" and torch.cuda.is_available()
        out = torch.empty((offsets[-1], 3, S, S), dtype=torch.float32, device=self.device, pin_memory=pin)
        with self._lock:
            outs = [out[a:b] for a, b in zip(offsets, offsets[1:])]
            errors = [self._over_limit(rec) for rec in records]
            todo = [i for i, err in enumerate(errors) if err is None]
            if todo:
                done = self._decode_into([records[i] for i in todo], [outs[i] for i in todo])
                for i, err in zip(todo, done):
                    errors[i] = err
            for rec, err, a, b in zip(records, errors, offsets, offsets[1:]):
                if err is not None:
                    out[a:b].zero_()
                    self.failures += 1
                    logger.warning(
                        "image %s failed to decode (%s); using blank tiles, its sample's loss is masked",
                        rec.source,
                        err,
                    )
        return out, [err is None for err in errors]

    def _decode_into(self, records: Sequence[ImageRecord], outs: list[torch.Tensor]) -> list[str | None]:
        """Fill ``outs[i]`` with the tiles of ``records[i]``; return an error text per failed image."""
        raise NotImplementedError

    def _over_limit(self, rec: ImageRecord) -> str | None:
        """Why an image is not decoded at all: its header (else its stored size) claims more than
        ``max_pixels``, the limit preprocessing applied; such a decode would stall the loader."""
        w, h = header_size(rec.data) or rec.size
        if w * h > self.cfg.max_pixels:
            return f"{w}x{h} = {w * h} pixels > max_pixels {self.cfg.max_pixels}; not decoded"
        return None

    def write_tiles(
        self, out: torch.Tensor, grid: torch.Tensor, thumb: torch.Tensor | None, rec: ImageRecord
    ) -> None:
        """Cut the resized HWC uint8 ``grid`` into row-major tiles (+ thumbnail) and normalize into ``out``.

        The division by 255, then mean subtraction, then division by std are the exact float32
        steps of torchvision's ToTensor + Normalize, so the PIL backend matches InternVL bitwise.
        """
        S = self.cfg.tile_size
        cols, rows = rec.grid
        if tuple(grid.shape) != (rows * S, cols * S, 3):
            raise ValueError(
                f"image {rec.source}: resized to {tuple(grid.shape)}, expected {(rows * S, cols * S, 3)}"
            )
        n = cols * rows
        out[:n].view(rows, cols, 3, S, S).copy_(grid.view(rows, S, cols, S, 3).permute(0, 2, 4, 1, 3))
        if thumb is not None:
            out[n].copy_(thumb.permute(2, 0, 1))
        out.div_(255.0).sub_(self._mean).div_(self._std)

    def needs_thumbnail(self, rec: ImageRecord) -> bool:
        """True when the record's tiles end with a whole-image thumbnail."""
        return rec.num_tiles > rec.grid[0] * rec.grid[1]

    def close(self) -> None:
        """Release worker threads and pipelines (safe to call twice)."""


def _check_record(rec: ImageRecord) -> None:
    """Reject records whose grid cannot be tiled, naming the image."""
    cols, rows = rec.grid
    if not (isinstance(cols, int) and isinstance(rows, int) and cols > 0 and rows > 0):
        raise ValueError(f"image {rec.source}: grid must be two positive ints (cols, rows), got {rec.grid!r}")
