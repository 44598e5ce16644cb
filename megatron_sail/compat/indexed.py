"""The ``.idx`` file format of megatron-core's IndexedDataset, read without Megatron.

Written for megatron-core 0.16.1 (see ``WORKAROUNDS`` in ``__init__.py``), ``idx_format``.
Megatron's reader asserts on a damaged index with no message (or reads past the end), so the
integrity checks (data/integrity.py) read the header themselves and name the file and the
fault. The layout, all little-endian:

    magic            9 bytes   b"MMIDIDX\\x00\\x00" (Megatron's private ``_INDEX_HEADER``)
    version          uint64    1
    dtype code       uint8     Megatron's ``DType`` code of the ``.bin`` items
    sequence count   uint64    S
    document count   uint64    D (document indices, one more than documents)
    sequence lengths int32 x S
    sequence pointers int64 x S (byte offsets into the ``.bin``)
    document indices int64 x D (first sequence of each document, then S)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34
"""magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8."""
LENGTH_BYTES, POINTER_BYTES, DOCUMENT_BYTES = 4, 8, 8
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int32): 4}
"""Megatron's DType codes of the streams this project writes."""


@dataclass(frozen=True)
class IdxHeader:
    """The fixed-size start of an ``.idx`` file."""

    magic: bytes
    version: int
    dtype_code: int
    sequences: int
    documents: int

    @property
    def file_bytes(self) -> int:
        """The size an index with these counts has."""
        return (
            HEADER_BYTES + self.sequences * (LENGTH_BYTES + POINTER_BYTES) + self.documents * DOCUMENT_BYTES
        )

    @property
    def documents_offset(self) -> int:
        """Byte offset of the first document index."""
        return HEADER_BYTES + self.sequences * (LENGTH_BYTES + POINTER_BYTES)


def parse_header(head: bytes) -> IdxHeader:
    """The header fields of the first ``HEADER_BYTES`` of an index (checked by the caller)."""
    if len(head) < HEADER_BYTES:
        raise ValueError(f"{len(head)} bytes, shorter than an index header ({HEADER_BYTES})")
    (version,) = struct.unpack("<Q", head[9:17])
    sequences, documents = struct.unpack("<QQ", head[18:34])
    return IdxHeader(bytes(head[:9]), version, head[17], sequences, documents)


def pack_header(dtype, sequences: int, documents: int) -> bytes:
    """The first ``HEADER_BYTES`` of an index of ``sequences`` items of ``dtype`` (one of
    ``DTYPE_CODES``) and ``documents`` document indices; the arrays follow it."""
    return (
        MAGIC
        + struct.pack("<Q", VERSION)
        + struct.pack("<B", DTYPE_CODES[np.dtype(dtype)])
        + struct.pack("<QQ", sequences, documents)
    )


def read_document_index(f, at: int) -> int:
    """The int64 document index at byte ``at`` of an open index file."""
    f.seek(at)
    return struct.unpack("<q", f.read(DOCUMENT_BYTES))[0]
