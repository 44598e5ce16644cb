"""Every image backend: 16-bit PNGs keep their brightness, and the pixel limit holds at train time."""

import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from megatron_sail.config.images import DEFAULT_MAX_IMAGE_PIXELS, ImageConfig
from megatron_sail.data.images import build_image_pipeline, dali_available
from megatron_sail.data.records import ImageRecord

BACKENDS = ["pil"] + (["dali-cpu"] if dali_available() else [])
MEAN, STD = 0.485, 0.229  # red channel


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png16(grey: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (grey 0, grey+alpha 4, RGB 2, RGBA 6)."""
    h, w = grey.shape
    opaque = np.full_like(grey, 65535)
    planes = {0: [grey], 4: [grey, opaque], 2: [grey] * 3, 6: [grey] * 3 + [opaque]}
    px = np.stack(planes[colour_type], -1).astype(">u2")
    raw = b"".join(b"\x00" + px[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


GRADIENT = np.tile(np.linspace(0, 61430, 64).round().astype(np.uint16), (64, 1))


def pixel_values(backend: str, data: bytes) -> np.ndarray:
    """Red-channel uint8 levels of a 64x64 image decoded as one 64 px tile."""
    pipe = build_image_pipeline(ImageConfig(backend=backend, tile_size=64, threads=1))
    tiles, ok = pipe.tiles([ImageRecord(data, (1, 1), False, (64, 64), 0, "t:0")])
    assert ok == [True]
    return (tiles[0, 0].numpy() * STD + MEAN) * 255


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("colour_type", [0, 4, 2, 6])
def test_16bit_png_keeps_its_brightness(backend, colour_type):
    """A 0..61430 gradient: the mean level must be ~61430/2/257 = 119.5, not ~251 (clipped at 255)."""
    px = pixel_values(backend, png16(GRADIENT, colour_type))
    assert abs(px.mean() - GRADIENT.mean() / 257) < 1.0
    # left to right, the decoded levels follow v / 257 within one level
    assert np.abs(px[0] - GRADIENT[0] / 257).max() < 1.6


def test_pil_writes_i16_as_png_and_it_decodes_the_same():
    """Pillow's own 16-bit grey PNG (mode I;16) takes the same path."""
    buf = io.BytesIO()
    Image.fromarray(GRADIENT).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    for backend in BACKENDS:
        assert abs(pixel_values(backend, buf.getvalue()).mean() - GRADIENT.mean() / 257) < 1.0


def header_only_png(w: int, h: int) -> bytes:
    """A tiny PNG whose IHDR claims w x h (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + idat + _chunk(b"IEND", b"")


@pytest.mark.parametrize("backend", BACKENDS)
def test_over_limit_images_are_not_decoded_at_train_time(backend, caplog):
    """The header's claim is checked before decoding: blank tiles and a warning naming the image,
    the other images of the batch intact; a lower ImageConfig.max_pixels refuses smaller ones."""
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 0, 0)).save(good, format="PNG")
    recs = [
        ImageRecord(good.getvalue(), (1, 1), False, (64, 64), 0, "d:0"),
        ImageRecord(header_only_png(20000, 20000), (1, 1), False, (64, 64), 0, "d:1"),
    ]
    pipe = build_image_pipeline(ImageConfig(backend=backend, tile_size=64, threads=1))
    assert pipe.cfg.max_pixels == DEFAULT_MAX_IMAGE_PIXELS
    with caplog.at_level(logging.WARNING):
        tiles, ok = pipe.tiles(recs)
    assert ok == [True, False] and pipe.failures == 1
    assert "d:1" in caplog.text and "400000000 pixels > max_pixels" in caplog.text
    assert (
        float(tiles[1].abs().max()) == 0.0
        and abs(float(tiles[0, 0].mean()) - (200 / 255 - MEAN) / STD) < 1e-4
    )
    small = build_image_pipeline(ImageConfig(backend=backend, tile_size=64, threads=1, max_pixels=64 * 63))
    assert small.tiles(recs[:1])[1] == [False]


def test_pil_checks_the_real_size_of_formats_without_a_parsed_header():
    """A BMP (no PNG/JPEG header to read) whose stored size understates it is still refused."""
    from megatron_sail.data.images.pil import decode_and_resize

    buf = io.BytesIO()
    Image.new("RGB", (80, 80)).save(buf, format="BMP")
    with pytest.raises(ValueError, match="max_pixels"):
        decode_and_resize(buf.getvalue(), (1, 1), 32, False, max_pixels=80 * 79)
    assert decode_and_resize(buf.getvalue(), (1, 1), 32, False, max_pixels=80 * 80)[0].shape == (32, 32, 3)


def test_max_pixels_must_be_positive():
    with pytest.raises(ValueError, match="max_pixels"):
        ImageConfig(max_pixels=0)
