"""Training-side datasets: one prefix's packed rows, and a weighted blend of prefixes.

``PackedDataset(prefix)[i]`` is row i as a ``PackedRow`` (records.py), read memory-mapped.
``BlendedDataset`` is an endless, indexable stream: row k of the stream is a pure function of
(prefixes, weights, seed, k), so the trainer shards it by data-parallel rank with plain indices
and resumes exactly from the number of rows consumed (``state_dict``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence, Union

import numpy as np

from megatron_sail.data.indexed import PackedReader
from megatron_sail.data.loading.permutation import FeistelPermutation, derive_key
from megatron_sail.data.records import ImageRecord, PackedRow


@dataclass(frozen=True)
class TokenizerMeta:
    """Token ids and image geometry stored at preprocessing time (no tokenizer needed)."""

    img_context_id: int
    """<IMG_CONTEXT>: positions the model fills with visual tokens."""
    img_start_id: int
    """<img>"""
    img_end_id: int
    """</img>"""
    im_start_id: int
    """<|im_start|>"""
    im_end_id: int
    """<|im_end|>"""
    pad_id: int
    """Token of the padded row tail."""
    vocab_size: int
    """Ids in use (special tokens included); the model's vocab must be at least this."""
    tokens_per_tile: int
    """Visual tokens per tile."""
    tile_size: int
    """Tile side in pixels."""

    @classmethod
    def from_meta(cls, meta: dict) -> "TokenizerMeta":
        """Read the ``tokenizer`` block of a dataset's meta.json."""
        t = meta["tokenizer"]
        return cls(**{f: int(t[f]) for f in cls.__dataclass_fields__})


class PackedDataset:
    """Rows of one preprocessed prefix; ``verify`` is PackedReader's load-time check level."""

    def __init__(self, prefix: str, verify: str = "cheap"):
        self.prefix = prefix
        self.reader = PackedReader(prefix, verify)
        self.meta = self.reader.meta
        self.seq_length = int(self.meta["seq_length"])
        self.tokenizer_meta = TokenizerMeta.from_meta(self.meta)
        self.thumbnail = bool(self.meta["tiling"]["thumbnail"])

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> PackedRow:
        first, toks, masks, image_ids = self.reader.row(int(i))
        n = self.seq_length
        tokens = np.full(n, self.tokenizer_meta.pad_id, dtype=np.int64)
        labels = np.zeros(n, dtype=np.int64)
        loss_mask = np.zeros(n, dtype=np.float32)
        bounds = [0]
        for t, m in zip(toks, masks):
            a, b = bounds[-1], bounds[-1] + len(t)
            tokens[a:b] = t
            labels[a : b - 1] = t[1:]
            loss_mask[a:b] = m
            bounds.append(b)
        if bounds[-1] < n:
            bounds.append(n)
        images = []
        for j in image_ids:
            cols, rows, thumb, w, h, sample = (int(v) for v in self.reader.image_meta[j])
            images.append(
                ImageRecord(
                    self.reader.image_bytes(j),
                    (cols, rows),
                    bool(thumb),
                    (w, h),
                    sample - first,
                    f"{self.prefix}:{j}",
                )
            )
        return PackedRow(tokens, labels, loss_mask, np.asarray(bounds, dtype=np.int32), len(toks), images)


def parse_data_path(data_path: Union[str, Sequence[str]]) -> tuple[list[str], list[float]]:
    """Megatron-style ``"w1 p1 w2 p2"`` / ``"p1 p2"`` (string or list) -> (prefixes, weights).

    List items are split on whitespace too, so a quoted ``--data-path "0.7 a 0.3 b"`` means the
    same as the unquoted words (prefixes cannot contain spaces).
    """
    if isinstance(data_path, str):
        data_path = [data_path]
    items = [word for x in data_path for word in str(x).split()]
    if not items:
        raise ValueError("empty data path")

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if len(items) % 2 == 0 and all(is_number(w) for w in items[0::2]):
        return items[1::2], [float(w) for w in items[0::2]]
    if any(is_number(x) for x in items):
        raise ValueError(f"data path {items}: expected 'w1 p1 w2 p2 ...' or 'p1 p2 ...'")
    return items, [1.0] * len(items)


class BlendedDataset:
    """Endless weighted blend of prefixes; ``blended[k]`` is row k of the stream.

    The stream is cut into periods of ``period`` rows. Within a period the dataset of each slot
    comes from the greedy schedule Megatron uses (always pick the dataset furthest below its
    target share), computed once; so dataset d supplies exactly its share of each period. The
    j-th row taken from dataset d is row perm_e(j mod len(d)) of it, where perm_e is a seeded
    bijection of epoch e = j // len(d), evaluated per index (permutation.py), never built.
    Cost per index: O(1) whatever the number of sources or their lengths. Memory: the slot
    tables (3 x period int64 = 240 KB at 10,000) + one reader per source + at most
    ``PERM_CACHE`` permutation keys (~0.3 KB each); no per-row state.
    """

    ORDER = "feistel-v1"
    """Name of the row-order rule, kept in state_dict (the rule before it, a materialized numpy
    permutation per (dataset, epoch), gave a different order)."""
    PERM_CACHE = 4096
    """(dataset, epoch) permutation keys kept; a miss costs ~10 us, not a rebuild."""

    def __init__(
        self,
        prefixes: Sequence[str],
        weights: Sequence[float],
        seed: int = 1234,
        period: int = 10000,
        verify: str = "cheap",
    ):
        if len(prefixes) != len(weights) or not prefixes:
            raise ValueError("need one weight per prefix and at least one prefix")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
        self.prefixes = list(prefixes)
        self.weights = [w / sum(weights) for w in weights]
        self.seed = int(seed)
        self.datasets = [PackedDataset(p, verify) for p in self.prefixes]
        for p, d, w in zip(self.prefixes, self.datasets, self.weights):
            if len(d) == 0 and w > 0:
                raise ValueError(f"{p}: dataset has no rows")
        seqs = {d.seq_length for d in self.datasets}
        if len(seqs) != 1:
            raise ValueError(f"datasets have different seq_length: {sorted(seqs)}")
        self.seq_length = seqs.pop()
        self.tokenizer_meta = self.datasets[0].tokenizer_meta
        for p, d in zip(self.prefixes, self.datasets):
            if d.tokenizer_meta != self.tokenizer_meta:
                raise ValueError(f"{p}: tokenizer ids differ from {self.prefixes[0]}")
        self.period = period
        self._slot_dataset, self._slot_rank, self._per_period = self._schedule(period)
        self.position = 0
        self._lengths = [len(d) for d in self.datasets]
        self._perm = lru_cache(maxsize=self.PERM_CACHE)(self._permutation)

    def _schedule(self, period: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dataset of each slot of a period, its rank among that dataset's slots, and counts."""
        w = np.asarray(self.weights)
        counts = np.zeros(len(w), dtype=np.int64)
        slot_ds = np.zeros(period, dtype=np.int64)
        slot_rank = np.zeros(period, dtype=np.int64)
        for k in range(period):
            d = int(np.argmax(w * (k + 1) - counts))
            slot_ds[k], slot_rank[k] = d, counts[d]
            counts[d] += 1
        return slot_ds, slot_rank, counts

    def _permutation(self, d: int, epoch: int) -> FeistelPermutation:
        """Row order of dataset d in one epoch: seeded by (seed, d, epoch) only, so resumable."""
        return FeistelPermutation(self._lengths[d], derive_key(self.seed, d, epoch))

    def locate(self, k: int) -> tuple[int, int]:
        """(dataset index, row index) of stream row k."""
        if k < 0:
            raise IndexError(f"stream index {k} < 0")
        p, slot = divmod(int(k), self.period)
        d = int(self._slot_dataset[slot])
        j = p * int(self._per_period[d]) + int(self._slot_rank[slot])
        epoch, r = divmod(j, self._lengths[d])
        return d, self._perm(d, epoch)(r)

    def __getitem__(self, k: int) -> PackedRow:
        d, i = self.locate(k)
        row = self.datasets[d][i]
        row.source_index = d
        return row

    def row_shape(self, k: int) -> tuple[list[int], int]:
        """(sample lengths, image tiles) of stream row k without reading its bytes."""
        d, i = self.locate(k)
        return self.datasets[d].reader.row_shape(i)

    def source_names(self) -> list[str]:
        """A short name per prefix for per-dataset metrics: its base name, or its index where
        base names repeat."""
        names = [os.path.basename(p.rstrip("/")) or str(i) for i, p in enumerate(self.prefixes)]
        return [n if names.count(n) == 1 else f"{i}_{n}" for i, n in enumerate(names)]

    def __len__(self) -> int:
        """Rows in one pass over all datasets (the stream itself is endless; any k >= 0 works)."""
        return sum(len(d) for d in self.datasets)

    def __iter__(self) -> Iterator[PackedRow]:
        while True:
            row = self[self.position]
            self.position += 1
            yield row

    def state_dict(self) -> dict:
        """Position in the stream plus what defines the stream (checked on load)."""
        return {
            "position": self.position,
            "prefixes": self.prefixes,
            "weights": self.weights,
            "seed": self.seed,
            "period": self.period,
            "order": self.ORDER,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; refuses a state from a different blend."""
        if state.get("order", self.ORDER) != self.ORDER:
            raise ValueError(f"data state mismatch on order: saved {state['order']!r}, now {self.ORDER!r}")
        for key in ("prefixes", "seed", "period"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data state mismatch on {key}: saved {state[key]!r}, now {getattr(self, key)!r}"
                )
        if not np.allclose(state["weights"], self.weights):
            raise ValueError(f"data state mismatch on weights: saved {state['weights']}, now {self.weights}")
        self.position = int(state["position"])


def build_blended(
    data_path: Union[str, Sequence[str]], seed: int = 1234, verify: str = "cheap"
) -> BlendedDataset:
    """BlendedDataset from a Megatron-style data path (``--data-path "w1 p1 w2 p2"``), each
    source checked at ``verify`` (``--data-verify``) as it is opened."""
    prefixes, weights = parse_data_path(data_path)
    return BlendedDataset(prefixes, weights, seed, verify=verify)
