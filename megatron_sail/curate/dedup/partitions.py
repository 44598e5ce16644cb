"""What the grouping pass writes to its work folder: edge records between images and the
append-only partition files that candidate records are scattered to. Shared by the exact/near
pass (grouping.py) and the semantic pass (semantic.py), so neither imports the other for it.
"""

from __future__ import annotations

import os

import numpy as np

EXACT, NEAR, SEMANTIC = 1, 2, 4
"""Edge kinds (bit flags)."""
EDGE = np.dtype([("a", "<i8"), ("b", "<i8"), ("kind", "<i8"), ("dist", "<i8"), ("pa", "<i8"), ("pb", "<i8")])
"""One verified pair: ids a < b, kind (bit flags), Hamming distance, the shards' positions."""


class Partitions:
    """Append-only partition files of fixed-width records, with a bounded write buffer."""

    def __init__(self, folder: str, prefix: str, count: int, dtype: np.dtype, buffer_records: int):
        self.paths = [os.path.join(folder, f"{prefix}{p:05d}.bin") for p in range(count)]
        for p in self.paths:
            open(p, "wb").close()
        self.dtype, self.count, self.limit = dtype, count, buffer_records
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.buffered = 0

    def add(self, part: np.ndarray, records: np.ndarray) -> None:
        self.pending.append((part, records))
        self.buffered += len(records)
        if self.buffered >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        part = np.concatenate([p for p, _ in self.pending])
        recs = np.concatenate([r for _, r in self.pending])
        self.pending, self.buffered = [], 0
        order = np.argsort(part, kind="stable")
        part, recs = part[order], recs[order]
        cuts = np.searchsorted(part, np.arange(self.count + 1))
        for p in range(self.count):
            if cuts[p + 1] > cuts[p]:
                with open(self.paths[p], "ab") as f:
                    recs[cuts[p] : cuts[p + 1]].tofile(f)

    def load(self, p: int) -> np.ndarray:
        return np.fromfile(self.paths[p], dtype=self.dtype)
