"""Image size from the encoded header, without decoding pixels.

Preprocessing needs only (width, height) to choose the tile grid, so JPEG and PNG are parsed
here in a few microseconds and stored as they are (DALI decodes both). The structure is checked
(PNG: every chunk inside the file, IDAT present, IEND last; JPEG: an end marker after the scan)
so a truncated file is rejected offline instead of failing at training time. Other formats are
decoded once with PIL and re-encoded as PNG (lossless; 16-bit grey becomes 8-bit).

Every image is held to a pixel limit before anything decodes it: a header claiming 30000x30000
is a reject (``image_too_large``), never an allocation. The trainer's decoders apply the same
limit (``ImageConfig.max_pixels``), so what preprocessing accepts is decodable at train time.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from typing import Optional

import numpy as np

from megatron_sail.config.images import DEFAULT_MAX_IMAGE_PIXELS
from megatron_sail.data.template import SampleError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, ...); C4/C8/CC are not frames.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+")


def clean_message(text: str) -> str:
    """An error text without memory addresses (``<_io.BytesIO object at 0x7f..>``), so reject
    reports are byte-identical between runs."""
    return _ADDRESS.sub("", text)


def _png_size(data: bytes) -> tuple[int, int]:
    """Width/height from IHDR; the chunks must tile the file, with an IDAT and IEND last."""
    n = len(data)
    if n < 33 or data[12:16] != b"IHDR":
        raise SampleError("truncated_image" if n < 33 else "undecodable_image", "bad PNG header")
    w, h = struct.unpack(">II", data[16:24])
    pos, idat = 8, False
    while pos + 12 <= n:
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            break
        if kind == b"IDAT":
            idat = True
        elif kind == b"IEND":
            if not idat:
                raise SampleError("truncated_image", "PNG has no image data (IDAT) before IEND")
            return w, h
        pos = end
    raise SampleError("truncated_image", "PNG has no IEND chunk")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Width/height from the first SOF segment; an EOI marker must follow the scan start."""
    pos, n, size = 2, len(data), None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise SampleError("undecodable_image", f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF:
            if pos + 9 > n:
                break
            h, w = struct.unpack(">HH", data[pos + 5 : pos + 9])
            size = (w, h)
        if marker == 0xDA:  # start of scan: entropy-coded data follows, then EOI
            if size is None:
                raise SampleError("undecodable_image", "JPEG scan before any frame header")
            if data.rfind(b"\xff\xd9", pos) < 0:
                raise SampleError("truncated_image", "JPEG has no end-of-image marker")
            return size
        pos += 2 + length
    raise SampleError("truncated_image", "JPEG ends before its image data")


def header_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) claimed by a PNG or JPEG header, None for other or broken data.

    The train-time decoders call this to refuse over-limit images before decoding them.
    """
    try:
        if data.startswith(PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
    except (SampleError, struct.error):
        return None
    return None


def check_pixels(w: int, h: int, max_pixels: int) -> None:
    """Refuse an image whose claimed size exceeds the pixel limit (before decoding it)."""
    if w * h > max_pixels:
        raise SampleError(
            "image_too_large", f"{w}x{h} = {w * h} pixels > limit {max_pixels} (--max-image-pixels)"
        )


def to_8bit(im):
    """16-bit grey (PIL modes I;16*, and I as 16-bit PNGs decode) -> 8-bit L.

    PIL's own ``convert("RGB")`` clips these at 255, so a 0..61430 gradient came out almost
    white. Scaled as v * 255 / 65535, rounded: what DALI's decoders do for 16-bit PNGs.
    """
    from PIL import Image

    if im.mode != "I" and not im.mode.startswith("I;16"):
        return im
    a = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
    return Image.fromarray(((a + 128) // 257).astype(np.uint8), "L")


def _reencode(data: bytes, max_pixels: int) -> tuple[bytes, int, int]:
    """Decode any PIL-readable format once and store it as PNG (lossless)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # our limit is checked below, before any pixel decodes
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                check_pixels(im.size[0], im.size[1], max_pixels)
                im.load()
                im = to_8bit(im)
                if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
                    im = im.convert("RGBA" if "A" in im.mode else "RGB")
                out = io.BytesIO()
                im.save(out, format="PNG")
                return out.getvalue(), im.size[0], im.size[1]
    except SampleError:
        raise
    except Image.DecompressionBombError as e:
        raise SampleError("image_too_large", clean_message(str(e))) from e
    except UnidentifiedImageError as e:
        raise SampleError("undecodable_image", "not a known image format") from e
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated_image" if "truncated" in str(e).lower() else "undecodable_image"
        raise SampleError(reason, clean_message(str(e))) from e
    except Exception as e:  # hostile files make decoders raise anything (struct.error, MemoryError, ...)
        raise SampleError("undecodable_image", f"{type(e).__name__}: {clean_message(str(e))}") from e


def image_info(
    data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, name: str = ""
) -> tuple[bytes, int, int]:
    """Return (bytes to store, width, height); JPEG/PNG pass through, others become PNG.

    ``name`` (the image file or tar member) starts every reject detail, so a report line says
    which image of a sample was bad.
    """
    try:
        if not data:
            raise SampleError("truncated_image", "empty file")
        if data.startswith(PNG_SIGNATURE):
            w, h = _png_size(data)
        elif data.startswith(b"\xff\xd8"):
            w, h = _jpeg_size(data)
        else:
            data, w, h = _reencode(data, max_pixels)
        if w <= 0 or h <= 0:
            raise SampleError("undecodable_image", f"image size {w}x{h}")
        check_pixels(w, h, max_pixels)
    except SampleError as e:
        if not name:
            raise
        raise SampleError(e.reason, f"{name}: {e.detail}" if e.detail else name) from e
    return data, w, h


def check_decodable(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Optional[str]:
    """None when PIL decodes the image fully, else why not (an ``undecodable_image`` reject)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > max_pixels:
                return f"{im.size[0]}x{im.size[1]} pixels > {max_pixels}"
            im.load()
        return None
    except Exception as e:  # noqa: BLE001 - any decoder failure is the same reject
        return clean_message(f"{type(e).__name__}: {e}")
