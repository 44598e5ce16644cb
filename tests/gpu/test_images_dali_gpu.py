"""The GPU 'dali' backend (nvJPEG 'mixed' decoder + GPU resize) against the PIL reference.

Skips without CUDA or without DALI. Tolerances are those of dali-cpu (tests/unit/test_images_dali.py);
nvJPEG's IDCT may differ from libjpeg-turbo's by a level, hence a slightly wider max.
"""

import io
import logging

import pytest
import torch
from PIL import Image

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("nvidia.dali")

from megatron_sail.config.images import ImageConfig  # noqa: E402
from megatron_sail.data.images import build_image_pipeline, resolve_backend  # noqa: E402
from megatron_sail.data.images.synthetic import synthetic_jpeg  # noqa: E402
from megatron_sail.data.records import ImageRecord  # noqa: E402
from megatron_sail.data.tiling import find_grid  # noqa: E402

LEVEL = 1 / 255 / 0.225


def record(data: bytes, source: str) -> ImageRecord:
    w, h = Image.open(io.BytesIO(data)).size
    return ImageRecord(data=data, grid=find_grid(w, h), thumbnail=True, size=(w, h), sample=0, source=source)


def test_dali_gpu_is_default_and_close_to_pil(caplog):
    assert resolve_backend("auto") == "dali"
    recs = [
        record(synthetic_jpeg(w, h, i), f"g:{i}")
        for i, (w, h) in enumerate([(1024, 768), (300, 900), (448, 448)])
    ]
    bad = ImageRecord(b"junk", (2, 1), True, (64, 32), 0, "junk:1")
    pil = build_image_pipeline(ImageConfig(backend="pil"))
    gpu = build_image_pipeline(ImageConfig(backend="auto", max_batch_images=4))
    ref, _ = pil.tiles(recs)
    with caplog.at_level(logging.WARNING):
        got, ok = gpu.tiles(recs[:1] + [bad] + recs[1:])
    assert ok == [True, False, True, True] and "junk:1" in caplog.text
    assert got.device.type == "cuda" and got.dtype == torch.float32
    n0 = recs[0].num_tiles
    assert torch.all(got[n0 : n0 + 3] == 0)
    got = torch.cat([got[:n0], got[n0 + 3 :]]).cpu()
    assert got.shape == ref.shape
    diff = (got - ref).abs()
    assert diff.mean() < 0.008
    assert torch.quantile(diff.flatten()[::7], 0.99) <= 2.01 * LEVEL
    assert diff.max() <= 12 * LEVEL
    again, ok = gpu.tiles(recs)  # the pipeline was rebuilt after the failure
    assert ok == [True] * 3 and torch.equal(again.cpu(), got)


def test_dali_gpu_16bit_png_and_pixel_limit():
    """A 16-bit grey gradient keeps its brightness (v / 257, as dali-cpu and pil); a header claiming
    20000x20000 is refused before the GPU decoder sees it."""
    from test_images_limits import GRADIENT, header_only_png, png16

    gpu = build_image_pipeline(ImageConfig(backend="dali", tile_size=64, threads=1))
    for colour_type in (0, 2):
        tiles, ok = gpu.tiles([ImageRecord(png16(GRADIENT, colour_type), (1, 1), False, (64, 64), 0, "g16")])
        px = (tiles[0, 0].cpu().numpy() * 0.229 + 0.485) * 255
        assert ok == [True] and abs(px.mean() - GRADIENT.mean() / 257) < 1.0
    tiles, ok = gpu.tiles([ImageRecord(header_only_png(20000, 20000), (1, 1), False, (64, 64), 0, "bomb")])
    assert ok == [False] and float(tiles.abs().max()) == 0.0
