"""The file digests of the project: SHA-256, read in chunks. Dataset checksums (meta.json)
and checkpoint manifests (manifest.json) record a file's; model soup compares a folder's."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 8 << 20
"""Bytes read at a time (bounded memory whatever the file's size)."""


def _feed(h, path: str | Path, chunk: int) -> None:
    """Add a file's bytes to a running hash, ``chunk`` bytes at a time."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)


def file_sha256(path: str | Path, chunk: int = CHUNK_BYTES) -> str:
    """Hex SHA-256 of one file."""
    h = hashlib.sha256()
    _feed(h, path, chunk)
    return h.hexdigest()


def tree_sha256(folder: str | Path, chunk: int = CHUNK_BYTES) -> str:
    """Hex SHA-256 over the relative path and bytes of every file below ``folder`` (sorted):
    equal for equal trees wherever they lie, different when a file is renamed or changed."""
    root, h = Path(folder), hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode())
        _feed(h, f, chunk)
    return h.hexdigest()
