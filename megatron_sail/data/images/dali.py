"""DALI backends: 'dali-cpu' (CPU decoder and resize) and 'dali' (nvJPEG "mixed" decoder, GPU resize).

Both run the same graph: decode to RGB (EXIF orientation ignored, as PIL does), bicubic resize
with antialiasing to the stored grid's pixel size, and a second resize of the decoded image to
the S x S thumbnail. The resized uint8 images are handed to the shared tiling + normalization
code (on the GPU for 'dali'). A DALI pipeline is unusable after a decode error, so on an error
the chunk is rerun image by image on a fresh pipeline to find the failed images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_sail.config.images import ImageConfig
from megatron_sail.data.images.pipeline import ImagePipeline
from megatron_sail.data.records import ImageRecord

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError as e:  # pragma: no cover - exercised only where DALI is missing
    raise ImportError(
        "the 'dali' and 'dali-cpu' image backends need NVIDIA DALI (pip package nvidia-dali-cuda130); "
        "use backend 'pil' or 'auto' without it"
    ) from e


class DaliPipeline(ImagePipeline):
    """DALI decode + resize on the CPU (gpu=False) or on the local GPU (gpu=True)."""

    def __init__(self, cfg: ImageConfig, gpu: bool) -> None:
        device = torch.device("cpu")
        self._device_id = None
        if gpu:
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "image backend 'dali' needs CUDA; use 'dali-cpu' or 'auto' on a CPU machine"
                )
            self._device_id = cfg.device_id if cfg.device_id is not None else torch.cuda.current_device()
            device = torch.device("cuda", self._device_id)
        super().__init__(cfg, device)
        self.backend = "dali" if gpu else "dali-cpu"
        self._pipe = self._build()

    def _build(self):
        """Build the synchronous DALI graph; prefetching happens in our own loader thread."""
        S = self.cfg.tile_size
        decoder_device = "mixed" if self._device_id is not None else "cpu"

        @pipeline_def(
            batch_size=self.cfg.max_batch_images,
            num_threads=self.cfg.threads,
            device_id=self._device_id,
            exec_pipelined=False,
            exec_async=False,
            prefetch_queue_depth=1,
        )
        def graph():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)  # (height, width)
            image = fn.decoders.image(
                encoded, device=decoder_device, output_type=types.RGB, adjust_orientation=False
            )
            grid = fn.resize(image, size=size, interp_type=types.INTERP_CUBIC, antialias=True)
            thumb = fn.resize(image, size=[S, S], interp_type=types.INTERP_CUBIC, antialias=True)
            return grid, thumb

        pipe = graph()
        pipe.build()
        return pipe

    def _decode_into(self, records: Sequence[ImageRecord], outs: list[torch.Tensor]) -> list[str | None]:
        """Run chunks of up to max_batch_images; isolate failures image by image."""
        errors: list[str | None] = [None] * len(records)
        step = self.cfg.max_batch_images
        for start in range(0, len(records), step):
            idx = list(range(start, min(start + step, len(records))))
            err = self._run([records[i] for i in idx], [outs[i] for i in idx])
            if err is None:
                continue
            if len(idx) == 1:
                errors[idx[0]] = err
                continue
            for i in idx:
                errors[i] = self._run([records[i]], [outs[i]])
        return errors

    def _run(self, records: Sequence[ImageRecord], outs: list[torch.Tensor]) -> str | None:
        """Run one DALI batch and write its tiles; on a DALI error rebuild and return the reason."""
        S = self.cfg.tile_size
        self._pipe.feed_input("encoded", [np.frombuffer(r.data, dtype=np.uint8) for r in records])
        self._pipe.feed_input("size", [np.array([r.grid[1] * S, r.grid[0] * S], np.float32) for r in records])
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            grids, thumbs = self._pipe.run(stream)  # outputs ordered before our stream
        except RuntimeError as e:
            self._pipe = self._build()
            if "decoders.image" not in str(e):
                raise  # not a data error: a broken pipeline must not silently blank every image
            return _reason(e)
        for i, (rec, out) in enumerate(zip(records, outs)):
            grid = self._to_torch(grids[i], stream)
            thumb = self._to_torch(thumbs[i], stream) if self.needs_thumbnail(rec) else None
            self.write_tiles(out, grid, thumb, rec)
        return None

    def _to_torch(self, tensor, stream) -> torch.Tensor:
        """Copy one DALI sample (CPU or GPU) into a uint8 torch tensor on our device."""
        dst = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=self.device)
        feed_ndarray(tensor, dst, cuda_stream=stream)
        return dst


def _reason(e: Exception) -> str:
    """The decoder's own words from a DALI error (which wraps them in a long pipeline traceback)."""
    text = str(e).split("encountered:", 1)[-1].replace("Current pipeline object is no longer valid.", "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "DALI: " + (" ".join(lines) if lines else type(e).__name__)
