"""Micro-batch assembly: stack packed rows and attach their image tiles.

Rows are stacked as [B, N]; ``cu_seqlens`` flattens every row's segment boundaries into one
THD (packed) sequence of B*N tokens, row b's boundaries offset by b*N. Tiles of all rows come out
in row order, and within a row in <IMG_CONTEXT> order, which is the order the model splices them.
A sample holding an image that failed to decode keeps its (blank) tiles but gets no loss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from megatron_sail.data.images.pipeline import ImagePipeline
from megatron_sail.data.records import PackedRow


@dataclass
class MicroBatch:
    """One micro-batch of packed rows, ready for the model."""

    tokens: torch.Tensor
    """int64 [B, N] input token ids."""
    labels: torch.Tensor
    """int64 [B, N] next-token targets."""
    loss_mask: torch.Tensor
    """float32 [B, N]; zero for padding, untrained tokens and samples whose image failed."""
    cu_seqlens: torch.Tensor
    """int32 [segments + 1] boundaries of every segment of every row in the flattened B*N tokens;
    the model's RoPE positions restart at each of them (there are no separate position ids)."""
    max_seqlen: int
    """Longest segment, for variable-length attention kernels."""
    tiles: torch.Tensor
    """float32 [num_tiles, 3, S, S] normalized tiles in <IMG_CONTEXT> order over all rows."""
    num_images: int
    """Images in the micro-batch."""
    num_tiles: int
    """Tiles in the micro-batch (thumbnails included)."""
    decode_failures: int
    """Images that failed to decode (blank tiles, loss masked); summed into the metrics."""
    failed_sources: list[str]
    """Sources ('<dataset>:<index>') of the failed images."""
    sources: torch.Tensor | None = None
    """int64 [B]: the --data-path prefix index of each row (per-dataset loss)."""
    image_spans: list[tuple[int, int, int, int]] | None = None
    """Per image in tile order: (row, first token, end token of its sample, tiles); for the
    sample-image summaries (--log-images)."""
    real_tokens: float = 0.0
    """Real (non-padding) tokens of its rows, for the throughput metrics; set by the loader's
    ``row_stats`` (collation itself does not keep the per-sample lengths)."""
    flops: float = 0.0
    """Model FLOPs of its rows; set with ``real_tokens``."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MicroBatch":
        """A copy with every tensor moved to ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=non_blocking)
        return MicroBatch(**moved)

    def pin_memory(self) -> "MicroBatch":
        """A copy with CPU tensors in pinned memory (for asynchronous host-to-GPU copies).

        Without CUDA there is nothing to pin for, and the batch is returned as it is.
        """
        if not torch.cuda.is_available():
            return self
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor) and v.device.type == "cpu" and not v.is_pinned():
                moved[k] = v.pin_memory()
        return MicroBatch(**moved)


def collate_rows(
    rows: list[PackedRow],
    pipeline: ImagePipeline,
    image_token_id: int | None = None,
    tokens_per_tile: int = 256,
) -> MicroBatch:
    """Stack ``rows`` into a MicroBatch and decode their images with ``pipeline``.

    With ``image_token_id`` set, each row's count of that token must equal its tiles times
    ``tokens_per_tile``: a cheap guard that tiles and <IMG_CONTEXT> runs line up.
    """
    if not rows:
        raise ValueError("collate_rows needs at least one row")
    n = len(rows[0].tokens)
    for b, row in enumerate(rows):
        _check_row(row, b, n, image_token_id, tokens_per_tile)
    records = [img for row in rows for img in row.images]
    tiles, ok = pipeline.tiles(records)
    loss_mask = torch.from_numpy(np.stack([r.loss_mask for r in rows]).astype(np.float32))
    failed = []
    k = 0
    for b, row in enumerate(rows):
        for img in row.images:
            if not ok[k]:
                lo, hi = int(row.cu_seqlens[img.sample]), int(row.cu_seqlens[img.sample + 1])
                loss_mask[b, lo:hi] = 0.0
                failed.append(img.source)
            k += 1
    cu = np.concatenate(
        [r.cu_seqlens[:-1].astype(np.int64) + b * n for b, r in enumerate(rows)] + [[len(rows) * n]]
    )
    return MicroBatch(
        tokens=torch.from_numpy(np.stack([r.tokens for r in rows]).astype(np.int64)),
        labels=torch.from_numpy(np.stack([r.labels for r in rows]).astype(np.int64)),
        loss_mask=loss_mask,
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_seqlen=int(np.diff(cu).max()),
        tiles=tiles,
        num_images=len(records),
        num_tiles=int(tiles.shape[0]),
        decode_failures=len(failed),
        failed_sources=failed,
        sources=torch.tensor([r.source_index for r in rows], dtype=torch.int64),
        image_spans=[
            (b, int(r.cu_seqlens[img.sample]), int(r.cu_seqlens[img.sample + 1]), img.num_tiles)
            for b, r in enumerate(rows)
            for img in r.images
        ],
    )


def _check_row(row: PackedRow, b: int, n: int, image_token_id: int | None, tokens_per_tile: int) -> None:
    """Reject rows that cannot be stacked or whose images do not fit their samples, naming the row."""
    where = f"row {b} (first image {row.images[0].source})" if row.images else f"row {b}"
    for name in ("tokens", "labels", "loss_mask"):
        if getattr(row, name).shape != (n,):
            raise ValueError(f"{where}: {name} has shape {getattr(row, name).shape}, expected ({n},)")
    cu = row.cu_seqlens
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != n or np.any(np.diff(cu) <= 0):
        raise ValueError(f"{where}: cu_seqlens {cu.tolist()} must rise strictly from 0 to {n}")
    for img in row.images:
        if not 0 <= img.sample < min(row.num_samples, len(cu) - 1):
            raise ValueError(
                f"{where}: image {img.source} names sample {img.sample}, row has {row.num_samples}"
            )
    if image_token_id is not None:
        found = int(np.count_nonzero(row.tokens == image_token_id))
        want = sum(img.num_tiles for img in row.images) * tokens_per_tile
        if found != want:
            raise ValueError(
                f"{where}: {found} image tokens but its images have {want // tokens_per_tile} tiles "
                f"({want} tokens)"
            )
