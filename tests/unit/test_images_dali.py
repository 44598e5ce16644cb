"""dali-cpu against the PIL reference: same grid and tile layout, pixels within a stated tolerance."""

import io
import logging
import threading

import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from megatron_sail.config.images import ImageConfig, TilingConfig  # noqa: E402
from megatron_sail.data.images import build_image_pipeline  # noqa: E402
from megatron_sail.data.images.synthetic import synthetic_jpeg, synthetic_photo  # noqa: E402
from megatron_sail.data.records import ImageRecord  # noqa: E402
from megatron_sail.data.tiling import find_grid  # noqa: E402

LEVEL = 1 / 255 / 0.225  # one uint8 step after normalization (largest for the smallest std)
# Tolerances reached by DALI's antialiased cubic resize against PIL's bicubic (measured on
# photo-like JPEGs, 448px tiles): mean ~0.0032, p99 = one uint8 step, max = three steps.
MEAN_TOL, P99_TOL, MAX_TOL = 0.006, LEVEL * 1.01, 6 * LEVEL


def record(data: bytes, source: str, tile: int, grid=None) -> ImageRecord:
    w, h = Image.open(io.BytesIO(data)).size
    grid = grid or find_grid(w, h, TilingConfig(tile_size=tile))
    return ImageRecord(data=data, grid=grid, thumbnail=True, size=(w, h), sample=0, source=source)


def pipelines(tile: int, max_batch: int = 8):
    pil = build_image_pipeline(ImageConfig(backend="pil", tile_size=tile, threads=2))
    dali = build_image_pipeline(
        ImageConfig(backend="dali-cpu", tile_size=tile, threads=2, max_batch_images=max_batch)
    )
    return pil, dali


def test_dali_cpu_close_to_pil_at_448():
    sizes = [(640, 480), (300, 900), (1000, 260), (448, 448)]
    recs = [record(synthetic_jpeg(w, h, i), f"p:{i}", 448) for i, (w, h) in enumerate(sizes)]
    pil, dali = pipelines(448)
    assert dali.backend == "dali-cpu"
    ref, ok_ref = pil.tiles(recs)
    got, ok = dali.tiles(recs)
    assert ok == ok_ref == [True] * 4
    assert got.shape == ref.shape and got.dtype == torch.float32
    diff = (got - ref).abs()
    assert diff.mean() < MEAN_TOL
    assert torch.quantile(diff.flatten()[::5], 0.99) <= P99_TOL
    assert diff.max() <= MAX_TOL
    assert torch.equal(got[-1], ref[-1]), "a 448x448 image needs no resize: decode must be bit-identical"


def test_dali_cpu_failures_chunking_and_recovery(caplog):
    good = [synthetic_jpeg(96 + 16 * i, 64, i) for i in range(5)]
    truncated = good[0][: len(good[0]) // 2]
    recs = [record(d, f"g:{i}", 32) for i, d in enumerate(good)]
    bad = [
        ImageRecord(b"junk", (2, 1), True, (64, 32), 0, "junk:1"),
        ImageRecord(truncated, recs[0].grid, True, recs[0].size, 0, "cut:2"),
    ]
    mixed = [recs[0], bad[0], recs[1], recs[2], bad[1], recs[3], recs[4]]
    pil, dali = pipelines(32, max_batch=3)
    clean, ok = dali.tiles(recs)
    assert ok == [True] * 5
    ref, _ = pil.tiles(recs)
    assert (clean - ref).abs().max() <= MAX_TOL
    with caplog.at_level(logging.WARNING):
        got, ok = dali.tiles(mixed)
    assert ok == [True, False, True, True, False, True, True]
    assert dali.failures == 2 and "junk:1" in caplog.text and "cut:2" in caplog.text
    n = [r.num_tiles for r in mixed]
    parts = torch.split(got, n)
    assert torch.all(parts[1] == 0) and torch.all(parts[4] == 0)
    assert torch.equal(torch.cat([parts[i] for i in (0, 2, 3, 5, 6)]), clean)
    again, ok = dali.tiles(recs)  # the pipeline was rebuilt after the errors
    assert ok == [True] * 5 and torch.equal(again, clean)


def test_dali_cpu_ignores_exif_orientation_like_pil():
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": PIL's open() and InternVL do not apply it
    Image.fromarray(synthetic_photo(120, 60, 4)).save(buf, format="JPEG", quality=90, exif=exif)
    rec = record(buf.getvalue(), "exif:0", 32)
    pil, dali = pipelines(32)
    ref, _ = pil.tiles([rec])
    got, ok = dali.tiles([rec])
    assert ok == [True] and got.shape == ref.shape
    assert (got - ref).abs().mean() < MEAN_TOL


def test_dali_errors_other_than_decoding_are_raised(monkeypatch):
    _, dali = pipelines(32)
    rec = record(synthetic_jpeg(64, 32, 0), "g:0", 32)

    def broken(*args, **kwargs):
        raise RuntimeError("Critical error in pipeline: Error in CPU operator `nvidia.dali.fn.resize`")

    monkeypatch.setattr(dali._pipe, "run", broken)
    with pytest.raises(RuntimeError, match="fn.resize"):
        dali.tiles([rec])
    assert dali.failures == 0
    tiles, ok = dali.tiles([rec])  # rebuilt pipeline works again
    assert ok == [True] and tiles.shape == (rec.num_tiles, 3, 32, 32)


def test_dali_pipeline_shared_by_two_threads():
    """A training and a validation loader may call one pipeline from two threads at once."""
    recs = [record(synthetic_jpeg(40 + 24 * i, 48, i), f"t:{i}", 32) for i in range(4)]
    _, dali = pipelines(32, max_batch=2)
    want = [dali.tiles(recs[i : i + 2])[0] for i in (0, 2)]
    results: list = [[], []]

    def work(k: int) -> None:
        for _ in range(6):
            results[k].append(dali.tiles(recs[2 * k : 2 * k + 2])[0])

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "concurrent calls deadlocked DALI"
    assert all(torch.equal(got, want[k]) for k in (0, 1) for got in results[k])
    assert len(results[0]) == len(results[1]) == 6
