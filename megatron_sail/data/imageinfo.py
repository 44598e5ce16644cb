"""Image size from the encoded header, without decoding pixels.

Preprocessing needs only (width, height) to choose the tile grid, so JPEG and PNG are parsed
here in a few microseconds and stored as they are (DALI decodes both). The end marker is checked
so a truncated file is rejected offline instead of failing at training time. Other formats are
decoded once with PIL and re-encoded as PNG (lossless).
"""
from __future__ import annotations

import io
import struct

from megatron_sail.data.template import SampleError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, ...); C4/C8/CC are not frames.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png_size(data: bytes) -> tuple[int, int]:
    """Width/height from IHDR; the file must end with the IEND chunk."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise SampleError("truncated_image" if len(data) < 33 else "undecodable_image", "bad PNG header")
    w, h = struct.unpack(">II", data[16:24])
    if data[-8:-4] != b"IEND":
        raise SampleError("truncated_image", "PNG has no IEND chunk")
    return w, h


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
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _SOF:
            if pos + 9 > n:
                break
            h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
            size = (w, h)
        if marker == 0xDA:  # start of scan: entropy-coded data follows, then EOI
            if size is None:
                raise SampleError("undecodable_image", "JPEG scan before any frame header")
            if data.rfind(b"\xff\xd9", pos) < 0:
                raise SampleError("truncated_image", "JPEG has no end-of-image marker")
            return size
        pos += 2 + length
    raise SampleError("truncated_image", "JPEG ends before its image data")


def _reencode(data: bytes) -> tuple[bytes, int, int]:
    """Decode any PIL-readable format once and store it as PNG (lossless)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
                im = im.convert("RGBA" if "A" in im.mode else "RGB")
            out = io.BytesIO()
            im.save(out, format="PNG")
            return out.getvalue(), im.size[0], im.size[1]
    except UnidentifiedImageError as e:
        raise SampleError("undecodable_image", str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated_image" if "truncated" in str(e).lower() else "undecodable_image"
        raise SampleError(reason, str(e)) from e


def image_info(data: bytes) -> tuple[bytes, int, int]:
    """Return (bytes to store, width, height); JPEG/PNG pass through, others become PNG."""
    if not data:
        raise SampleError("truncated_image", "empty file")
    if data.startswith(PNG_SIGNATURE):
        w, h = _png_size(data)
    elif data.startswith(b"\xff\xd8"):
        w, h = _jpeg_size(data)
    else:
        data, w, h = _reencode(data)
    if w <= 0 or h <= 0:
        raise SampleError("undecodable_image", f"image size {w}x{h}")
    return data, w, h
