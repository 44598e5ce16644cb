"""The PIL backend against an independent re-statement of InternVL's preprocessing."""

import io
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_sail.config.images import ImageConfig, TilingConfig
from megatron_sail.data.images import build_image_pipeline, dali_available, resolve_backend
from megatron_sail.data.images.pil import PilPipeline
from megatron_sail.data.images.synthetic import encode, synthetic_jpeg, synthetic_photo
from megatron_sail.data.records import ImageRecord
from megatron_sail.data.tiling import find_grid

S = 32
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def internvl_reference(data: bytes, grid: tuple[int, int], thumbnail: bool) -> np.ndarray:
    """load_image + dynamic_preprocess + build_transform, written out with PIL crops and numpy."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    cols, rows = grid
    resized = image.resize((cols * S, rows * S))  # PIL's default filter, as InternVL calls it
    crops = []
    for i in range(cols * rows):
        x, y = (i % cols) * S, (i // cols) * S
        crops.append(resized.crop((x, y, x + S, y + S)))
    if thumbnail and len(crops) != 1:
        crops.append(image.resize((S, S)))
    arr = np.stack([np.asarray(c, dtype=np.float32) for c in crops]) / np.float32(255)
    return ((arr - MEAN) / STD).transpose(0, 3, 1, 2)


def record(data: bytes, source: str, grid=None, thumbnail=True, sample=0) -> ImageRecord:
    w, h = Image.open(io.BytesIO(data)).size
    grid = grid or find_grid(w, h, TilingConfig(tile_size=S))
    return ImageRecord(data=data, grid=grid, thumbnail=thumbnail, size=(w, h), sample=sample, source=source)


def varied_images() -> list[bytes]:
    """JPEGs of several aspect ratios plus PNGs in RGBA, grayscale and palette modes."""
    out = [
        synthetic_jpeg(w, h, seed)
        for seed, (w, h) in enumerate([(200, 150), (90, 300), (500, 120), (64, 64), (257, 31)])
    ]
    photo = synthetic_photo(120, 80, 9)
    rgba = np.concatenate([photo, np.full((80, 120, 1), 128, np.uint8)], axis=2)
    out.append(encode(rgba, "PNG"))
    out.append(encode(photo[..., 1], "PNG"))
    buf = io.BytesIO()
    Image.fromarray(photo).quantize(colors=32).save(buf, format="PNG")
    out.append(buf.getvalue())
    return out


@pytest.mark.parametrize("threads", [1, 3])
def test_pil_matches_internvl_reference(threads):
    recs = [record(d, f"test:{i}") for i, d in enumerate(varied_images())]
    assert len({r.grid for r in recs}) >= 4, "aspect ratios should give several different grids"
    pipe = PilPipeline(ImageConfig(backend="pil", tile_size=S, threads=threads))
    tiles, ok = pipe.tiles(recs)
    want = np.concatenate([internvl_reference(r.data, r.grid, r.thumbnail) for r in recs])
    assert ok == [True] * len(recs)
    assert tiles.dtype == torch.float32 and tiles.shape == want.shape
    np.testing.assert_allclose(tiles.numpy(), want, rtol=0, atol=1e-6)
    pipe.close()


def test_stored_grid_is_used_not_recomputed():
    data = synthetic_jpeg(100, 100, 3)  # square: find_grid would choose (1, 1)
    pipe = PilPipeline(ImageConfig(backend="pil", tile_size=S, threads=1))
    for grid, thumb, n in [((3, 1), True, 4), ((2, 2), False, 4), ((1, 1), True, 1)]:
        rec = record(data, "grid:0", grid=grid, thumbnail=thumb)
        tiles, ok = pipe.tiles([rec])
        assert ok == [True] and tiles.shape == (n, 3, S, S)
        np.testing.assert_allclose(tiles.numpy(), internvl_reference(data, grid, thumb), rtol=0, atol=1e-6)


def test_failed_images_get_blank_tiles_and_a_warning(caplog):
    good = synthetic_jpeg(200, 150, 1)
    truncated = good[: len(good) // 2]
    recs = [
        record(good, "ok:0"),
        ImageRecord(b"not an image", (2, 1), True, (64, 32), 0, "junk:7"),
        record(good, "cut:3", grid=(4, 3)),
        record(good, "ok:1"),
    ]
    pipe = PilPipeline(ImageConfig(backend="pil", tile_size=S, threads=2))
    with caplog.at_level(logging.WARNING):
        tiles, ok = pipe.tiles(recs)
    assert ok == [True, False, True, True]
    recs[2] = ImageRecord(truncated, (4, 3), True, (200, 150), 0, "cut:3")
    with caplog.at_level(logging.WARNING):
        tiles, ok = pipe.tiles(recs)
    assert ok == [True, False, False, True]
    assert pipe.failures == 3
    assert tiles.shape[0] == 13 + 3 + 13 + 13
    assert torch.all(tiles[13:29] == 0)
    ref = torch.from_numpy(internvl_reference(good, recs[0].grid, True))
    assert torch.allclose(tiles[:13], ref, atol=1e-6) and torch.allclose(tiles[29:], ref, atol=1e-6)
    assert "junk:7" in caplog.text and "cut:3" in caplog.text


def test_empty_record_list_and_bad_grid():
    pipe = PilPipeline(ImageConfig(backend="pil", tile_size=S, threads=1))
    tiles, ok = pipe.tiles([])
    assert tiles.shape == (0, 3, S, S) and ok == []
    with pytest.raises(ValueError, match="bad:1"):
        pipe.tiles([ImageRecord(b"", (0, 2), True, (1, 1), 0, "bad:1")])


def test_auto_falls_back_to_pil_without_dali(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    assert not dali_available()
    assert resolve_backend("auto") == "pil"
    pipe = build_image_pipeline(ImageConfig(tile_size=S))
    assert isinstance(pipe, PilPipeline) and pipe.backend == "pil"
    rec = record(synthetic_jpeg(20, 20, 0), "x:0")
    tiles, ok = pipe.tiles([rec])
    assert ok == [True] and rec.grid == (1, 1) and tiles.shape == (1, 3, S, S)


def test_a_dali_that_fails_to_load_counts_as_absent(monkeypatch):
    class BrokenDali:
        """An import hook standing in for a DALI wheel whose shared library cannot be loaded."""

        def find_spec(self, name, path=None, target=None):
            if name == "nvidia.dali" or name.startswith("nvidia.dali."):
                raise OSError("libdali.so: cannot open shared object file")
            return None

    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BrokenDali()] + sys.meta_path)
    assert not dali_available() and resolve_backend("auto") == "pil"


def test_auto_picks_dali_cpu_without_cuda():
    if not dali_available() or torch.cuda.is_available():
        pytest.skip("needs DALI installed on a machine without CUDA")
    assert resolve_backend("auto") == "dali-cpu"
    with pytest.raises(RuntimeError, match="needs CUDA"):
        build_image_pipeline(ImageConfig(backend="dali"))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="backend"):
        ImageConfig(backend="opencv")
    with pytest.raises(ValueError, match="positive"):
        ImageConfig(threads=0)
    with pytest.raises(ValueError, match="prefetch_depth"):
        ImageConfig(prefetch_depth=0)
