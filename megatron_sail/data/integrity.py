"""Integrity of a packed dataset: per-file checksums written with it, and the checks on load.

``PackedWriter`` hashes every output file (SHA-256: why, and its cost, in docs/performance.md;
the ``.bin`` streams while they are written, the small files after) and records size and digest per file in meta.json's
``checksums`` block. Three levels of checking use them:

- ``cheap`` (the default of every load, ``--data-verify cheap``): cost independent of the number
  of rows, because every rank opens every source at every start (1,000 sources x 100M rows).
  Every file's size against the recorded size; the digests of files up to ``CHEAP_HASH_BYTES``
  (meta-sized: the image table, the reject report, the indexes of small datasets); each
  ``.idx`` header against its file size; the first and last offsets against the ``.bin`` size;
  and ``CHEAP_SAMPLE`` seeded entries (runs of 64, strided + random) of every stream and of the image table,
  each checked as the full check would. A dataset with at most ``CHEAP_SAMPLE`` entries per
  stream is checked in full.
- ``structure``: the full structure check, no digests: the headers, sequence offsets are the
  running sum of the lengths and end exactly at the ``.bin`` size, document indices are
  monotonic, the token, loss-mask and image streams agree, every image points into its row.
  Needs no checksums, so datasets written before them get it too. O(samples), vectorized, in
  chunks of ``STRUCTURE_CHUNK`` entries (bounded memory).
- ``full`` (``tools/inspect_dataset.py --verify``, ``--data-verify full``): every file's digest,
  ``.bin`` streams too, plus the full structure check. Reads every byte of the dataset.

Every failure is a ``DatasetIntegrityError`` (a ValueError) naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import numpy as np

from megatron_sail.compat import indexed as idx_format
from megatron_sail.hashing import file_sha256 as file_digest  # ALGORITHM's digest of a file

ALGORITHM = "sha256"
CHEAP_HASH_BYTES = 1 << 20
"""Files up to this size are hashed on every load (``cheap``); larger ones only at ``full``
(hashing the 64 MiB indexes of 1,000 sources would cost every rank ~40 s per start)."""
CHEAP_SAMPLE = 4096
"""Index entries (and image-table rows) that a ``cheap`` load checks per stream."""
SAMPLE_RUN = 64
"""Consecutive entries per sampled run (64 int64 pointers = one 4 KiB page)."""
SAMPLE_SEED = 0x5A11
"""Seed of the sampled entries: fixed, so every rank and every start checks the same ones."""
IDX_HEADER_BYTES = idx_format.HEADER_BYTES
"""Size of an ``.idx`` header (the format's facts live in compat/indexed.py)."""


class DatasetIntegrityError(ValueError):
    """A damaged, truncated or mismatched dataset file (the message names it)."""


class OutputWriteError(OSError):
    """Writing an output file failed (a full disk, most often): one line naming the file."""

    def __str__(self) -> str:
        return str(self.strerror)


def write_error(path: str, error: OSError) -> OutputWriteError:
    """ "no space left on device while writing PATH (N bytes free)" for ENOSPC, else the OS's
    reason with the path; the caller raises it ``from None`` so no chained traceback follows."""
    import errno

    if isinstance(error, OutputWriteError):
        return error
    if error.errno == errno.ENOSPC:
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)  # the nearest folder that exists: same disk
        try:
            st = os.statvfs(folder)
            free = f"{st.f_bavail * st.f_frsize} bytes free"
        except OSError:
            free = "free space unknown"
        return OutputWriteError(error.errno, f"no space left on device while writing {path} ({free})")
    return OutputWriteError(error.errno, f"{error.strerror or error} while writing {path}")


class HashingFile:
    """A binary file object that hashes what is written through it (Megatron's builder writes
    its ``.bin`` with ``write`` only), so a stream's digest costs no second read."""

    def __init__(self, f):
        self._f = f
        self.hash = hashlib.new(ALGORITHM)
        self.bytes = 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.bytes += len(memoryview(data).cast("B"))
        try:
            return self._f.write(data)
        except OSError as e:
            raise write_error(self._f.name, e) from None

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:  # the buffered tail hits the full disk here
            raise write_error(self._f.name, e) from None

    def __getattr__(self, name):
        return getattr(self._f, name)


def checksums_block(files: dict[str, str], known: Optional[dict[str, tuple[int, str]]] = None) -> dict:
    """meta.json's ``checksums``: {name: {"bytes", ALGORITHM}} for {name: path}; ``known``
    holds (bytes, digest) already computed while writing."""
    out = {}
    for name, path in files.items():
        size = os.path.getsize(path)
        if known and name in known:
            n, digest = known[name]
            if n != size:  # something else wrote to the file: never record a wrong digest
                raise RuntimeError(f"{path}: {size} bytes on disk, {n} written through the hasher")
        else:
            digest = file_digest(path)
        out[name] = {"bytes": size, ALGORITHM: digest}
    return {"algorithm": ALGORITHM, "files": out}


def check_files(prefix: str, meta: dict, level: str) -> list[str]:
    """Problems (one line each, naming the file) of the recorded sizes / digests at ``level``.

    Returns [] when meta.json records no checksums (a dataset written before them).
    """
    block = meta.get("checksums")
    if not block:
        return []
    if block.get("algorithm") != ALGORITHM:
        return [f"{prefix}.meta.json: unknown checksum algorithm {block.get('algorithm')!r}"]
    problems = []
    for name, rec in sorted(block["files"].items()):
        path = f"{prefix}.{name}"
        if not os.path.exists(path):
            problems.append(f"{path}: missing (meta.json records {rec['bytes']} bytes)")
            continue
        size = os.path.getsize(path)
        if size != rec["bytes"]:
            problems.append(
                f"{path}: {size} bytes, meta.json records {rec['bytes']} (truncated, extended or replaced)"
            )
            continue
        if level == "full" or (level == "cheap" and size <= CHEAP_HASH_BYTES):  # structure: none
            digest = file_digest(path)
            if digest != rec[ALGORITHM]:
                problems.append(
                    f"{path}: {ALGORITHM} mismatch (recorded {rec[ALGORITHM][:16]}..., "
                    f"file has {digest[:16]}...): the file is damaged"
                )
    return problems


def check_idx_header(idx_path: str, dtype) -> None:
    """The ``.idx`` header must be Megatron's, of the stream's dtype, and its counts must
    account for the file size exactly (a truncated index otherwise fails deep in Megatron)."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(IDX_HEADER_BYTES)
    if len(head) < IDX_HEADER_BYTES:
        raise DatasetIntegrityError(
            f"{idx_path}: {size} bytes, shorter than an index header ({IDX_HEADER_BYTES}); truncated"
        )
    h = idx_format.parse_header(head)
    if h.magic != idx_format.MAGIC:
        raise DatasetIntegrityError(f"{idx_path}: not a Megatron index (bad magic {h.magic!r})")
    if h.version != idx_format.VERSION:
        raise DatasetIntegrityError(f"{idx_path}: index version {h.version}, expected {idx_format.VERSION}")
    want = idx_format.DTYPE_CODES[np.dtype(dtype)]
    if h.dtype_code != want:
        raise DatasetIntegrityError(
            f"{idx_path}: dtype code {h.dtype_code}, expected {want} ({np.dtype(dtype)})"
        )
    seqs, docs = h.sequences, h.documents
    if size != h.file_bytes:
        raise DatasetIntegrityError(
            f"{idx_path}: {size} bytes, but its header counts ({seqs} sequences, "
            f"{docs} documents) need {h.file_bytes}; truncated or damaged"
        )
    with open(idx_path, "rb") as f:  # Megatron asserts on the last one with no message
        first = idx_format.read_document_index(f, h.documents_offset) if docs else 0
        last = idx_format.read_document_index(f, max(size - 8, 0)) if docs else seqs
    if docs == 0 or first != 0 or last != seqs:
        raise DatasetIntegrityError(
            f"{idx_path}: document indices run {first}..{last}, not 0..{seqs} "
            f"(its sequence count); the index is damaged"
        )


STRUCTURE_CHUNK = 1 << 22
"""Index entries checked at a time: the structure check's memory stays ~100 MB whatever the
dataset's length (a 100M-sample index would otherwise need several GB of temporaries)."""


def check_stream(prefix: str, name: str, ds, itemsize: int) -> None:
    """Offsets of one IndexedDataset stream: contiguous, inside its ``.bin``, documents monotonic."""
    idx, bin_path = f"{prefix}.{name}.idx", f"{prefix}.{name}.bin"
    all_lengths, all_pointers = ds.index.sequence_lengths, ds.index.sequence_pointers
    total = 0  # byte offset where the next sequence must start
    for a in range(0, len(all_lengths), STRUCTURE_CHUNK):
        lengths = np.asarray(all_lengths[a : a + STRUCTURE_CHUNK], dtype=np.int64)
        if lengths.min() < 0:
            i = int(np.argmax(lengths < 0))
            raise DatasetIntegrityError(f"{idx}: sequence {a + i} has negative length {lengths[i]}")
        ends = total + np.cumsum(lengths * itemsize)
        starts = ends - lengths * itemsize
        bad = np.flatnonzero(np.asarray(all_pointers[a : a + len(lengths)], dtype=np.int64) != starts)
        if len(bad):
            i = int(bad[0])
            raise DatasetIntegrityError(
                f"{idx}: sequence {a + i} starts at byte {all_pointers[a + i]}, but "
                f"the lengths before it put it at {starts[i]}; the index is damaged"
            )
        total = int(ends[-1])
    size = os.path.getsize(bin_path)
    if total != size:
        raise DatasetIntegrityError(f"{bin_path}: {size} bytes, its index {idx} covers {total}")
    docs = ds.document_indices
    if (
        len(docs) == 0
        or docs[0] != 0
        or docs[-1] != len(all_lengths)
        or any(
            (np.diff(np.asarray(docs[a : a + STRUCTURE_CHUNK + 1], dtype=np.int64)) < 0).any()
            for a in range(0, len(docs), STRUCTURE_CHUNK)
        )
    ):
        raise DatasetIntegrityError(
            f"{idx}: document indices are not 0..{len(all_lengths)} in order; the index is damaged"
        )


def _check_image_counts(prefix: str, token_docs: int, images, image_meta: np.ndarray) -> str:
    """The image stream has one row per token row and the image table one line per image (cheap
    at any size, so both check levels run it); returns the table's path for later messages."""
    if token_docs != len(images.document_indices):
        raise DatasetIntegrityError(
            f"{prefix}.images.idx: {len(images.document_indices) - 1} rows, "
            f"{prefix}.tokens.idx has {token_docs - 1}"
        )
    meta_path = f"{prefix}.images_meta.npy"
    if image_meta.ndim != 2 or image_meta.shape[1] != 6 or len(image_meta) != len(images):
        raise DatasetIntegrityError(f"{meta_path}: shape {image_meta.shape}, expected ({len(images)}, 6)")
    return meta_path


def check_rows(prefix: str, tokens, loss_mask, images, image_meta: np.ndarray) -> None:
    """The three streams and the image table describe the same rows and samples."""
    if not np.array_equal(
        tokens.index.sequence_lengths, loss_mask.index.sequence_lengths
    ) or not np.array_equal(tokens.document_indices, loss_mask.document_indices):
        raise DatasetIntegrityError(
            f"{prefix}.loss_mask.idx: sample lengths differ from "
            f"{prefix}.tokens.idx (mixed or damaged outputs)"
        )
    meta_path = _check_image_counts(prefix, len(tokens.document_indices), images, image_meta)
    if not len(image_meta):
        return
    if (image_meta[:, :2] < 1).any() or (image_meta[:, 3:5] < 1).any():
        j = int(np.argmax((image_meta[:, :2] < 1).any(1) | (image_meta[:, 3:5] < 1).any(1)))
        raise DatasetIntegrityError(f"{meta_path}: image {j} has grid/size {image_meta[j, :5].tolist()}")
    row_of = (
        np.searchsorted(np.asarray(images.document_indices), np.arange(len(image_meta)), side="right") - 1
    )
    rows = np.asarray(tokens.document_indices)
    sample = image_meta[:, 5].astype(np.int64)
    bad = np.flatnonzero((sample < rows[row_of]) | (sample >= rows[row_of + 1]))
    if len(bad):
        j = int(bad[0])
        raise DatasetIntegrityError(
            f"{meta_path}: image {j} belongs to sample {sample[j]}, outside its "
            f"row {row_of[j]} (samples {rows[row_of[j]]}..{rows[row_of[j] + 1] - 1})"
        )


def sample_indices(n: int, k: int) -> np.ndarray:
    """Sorted distinct indices in [0, n) that a cheap load checks: k entries in runs of
    ``SAMPLE_RUN`` consecutive ones (a run touches one or two pages of each index array, so a
    cold load reads ~k / SAMPLE_RUN pages, not k): the first and the last run, half the runs
    evenly strided (damage spread over a region is met wherever it is), half at seeded random
    places (no fixed blind stride); all of them when n <= k."""
    if n <= k:
        return np.arange(n, dtype=np.int64)
    runs, width = max(2, k // SAMPLE_RUN), min(SAMPLE_RUN, k)
    rng = np.random.default_rng(SAMPLE_SEED)
    starts = np.concatenate(
        [
            [n - width],
            np.linspace(0, n - width, num=runs // 2, dtype=np.int64),
            rng.integers(0, n - width + 1, size=runs - runs // 2, dtype=np.int64),
        ]
    )
    return np.unique((starts[:, None] + np.arange(width)).ravel())


def check_stream_cheap(prefix: str, name: str, ds, itemsize: int) -> None:
    """``check_stream`` at a cost independent of the length: the first and last offsets against
    the ``.bin`` size, the document ends, and ``CHEAP_SAMPLE`` sampled entries checked for a
    non-negative length that ends where the next sequence starts."""
    lengths, pointers, docs = ds.index.sequence_lengths, ds.index.sequence_pointers, ds.document_indices
    n = len(lengths)
    if max(n, len(docs)) <= CHEAP_SAMPLE:
        return check_stream(prefix, name, ds, itemsize)
    idx, bin_path = f"{prefix}.{name}.idx", f"{prefix}.{name}.bin"
    size = os.path.getsize(bin_path)
    covered = 0
    if n:
        at = sample_indices(n, CHEAP_SAMPLE)
        lens = np.asarray(lengths[at], dtype=np.int64)
        if lens.min() < 0:
            i = int(np.argmax(lens < 0))
            raise DatasetIntegrityError(f"{idx}: sequence {at[i]} has negative length {lens[i]}")
        if pointers[0] != 0:
            raise DatasetIntegrityError(
                f"{idx}: sequence 0 starts at byte {pointers[0]}, not 0; the index is damaged"
            )
        ends = np.asarray(pointers[at], dtype=np.int64) + lens * itemsize
        nxt = np.asarray(pointers[at[:-1] + 1], dtype=np.int64)  # at[-1] is n - 1
        bad = np.flatnonzero(ends[:-1] != nxt)
        if len(bad):
            i = int(bad[0])
            raise DatasetIntegrityError(
                f"{idx}: sequence {at[i]} ends at byte {ends[i]}, but sequence "
                f"{at[i] + 1} starts at {nxt[i]}; the index is damaged"
            )
        covered = int(ends[-1])
    if covered != size:
        raise DatasetIntegrityError(f"{bin_path}: {size} bytes, its index {idx} covers {covered}")
    d = sample_indices(len(docs) - 1, CHEAP_SAMPLE) if len(docs) > 1 else np.zeros(0, np.int64)
    if (
        len(docs) == 0
        or docs[0] != 0
        or docs[-1] != n
        or (np.asarray(docs[d + 1], dtype=np.int64) < np.asarray(docs[d], dtype=np.int64)).any()
    ):
        raise DatasetIntegrityError(f"{idx}: document indices are not 0..{n} in order; the index is damaged")


def check_rows_cheap(prefix: str, tokens, loss_mask, images, image_meta: np.ndarray) -> None:
    """``check_rows`` on sampled sequences, rows and images (all of them in a small dataset)."""
    t_len, t_docs = tokens.index.sequence_lengths, tokens.document_indices
    if max(len(t_len), len(t_docs), len(image_meta)) <= CHEAP_SAMPLE:
        return check_rows(prefix, tokens, loss_mask, images, image_meta)
    s = sample_indices(len(t_len), CHEAP_SAMPLE)
    d = sample_indices(len(t_docs), CHEAP_SAMPLE)
    if (
        len(t_len) != len(loss_mask.index.sequence_lengths)
        or len(t_docs) != len(loss_mask.document_indices)
        or not np.array_equal(t_len[s], loss_mask.index.sequence_lengths[s])
        or not np.array_equal(t_docs[d], loss_mask.document_indices[d])
    ):
        raise DatasetIntegrityError(
            f"{prefix}.loss_mask.idx: sample lengths differ from "
            f"{prefix}.tokens.idx (mixed or damaged outputs)"
        )
    meta_path = _check_image_counts(prefix, len(t_docs), images, image_meta)
    if not len(image_meta):
        return
    j = sample_indices(len(image_meta), CHEAP_SAMPLE)
    table = np.asarray(image_meta[j], dtype=np.int64)
    small = (table[:, :2] < 1).any(1) | (table[:, 3:5] < 1).any(1)
    if small.any():
        i = int(np.argmax(small))
        raise DatasetIntegrityError(f"{meta_path}: image {j[i]} has grid/size {table[i, :5].tolist()}")
    row_of = np.searchsorted(images.document_indices, j, side="right") - 1
    first, end = (np.asarray(t_docs[row_of], dtype=np.int64), np.asarray(t_docs[row_of + 1], dtype=np.int64))
    bad = np.flatnonzero((table[:, 5] < first) | (table[:, 5] >= end))
    if len(bad):
        i = int(bad[0])
        raise DatasetIntegrityError(
            f"{meta_path}: image {j[i]} belongs to sample {table[i, 5]}, outside its "
            f"row {row_of[i]} (samples {first[i]}..{end[i] - 1})"
        )
