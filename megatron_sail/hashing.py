"""The one file digest of the project: SHA-256, read in chunks. Dataset checksums (meta.json)
and checkpoint manifests (manifest.json) both record it, so one function computes it."""

from __future__ import annotations

import hashlib

CHUNK_BYTES = 8 << 20
"""Bytes read at a time (bounded memory whatever the file's size)."""


def file_sha256(path: str, chunk: int = CHUNK_BYTES) -> str:
    """Hex SHA-256 of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
