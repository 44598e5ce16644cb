"""The on-disk packed multimodal format: writer (atomic) and low-level reader.

For an output prefix P (all streams use Megatron-Core's IndexedDataset, one *sequence* per
sample or image and one *document* per packed row, so row i is documents[i]..documents[i+1]):

- ``P.tokens.{bin,idx}``     int32 token ids of each sample;
- ``P.loss_mask.{bin,idx}``  uint8 shifted loss mask of each sample (labels are the next token);
- ``P.images.{bin,idx}``     uint8 encoded bytes of each image (a row's images = its document);
- ``P.images_meta.npy``      int32 [images, 6]: cols, rows, thumbnail, width, height, sample;
- ``P.meta.json``            tokenizer ids, tiling, packing, stats, reject counts, block table;
- ``P.rejects.jsonl``        one line per rejected input record (source, key, reason, detail).

Everything is written under temporary names and renamed once complete, ``meta.json`` last (an
older meta.json under the prefix is removed first): a prefix whose meta.json exists is complete;
an interrupted run leaves no complete-looking dataset under the final name.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from megatron_sail.data import integrity
from megatron_sail.data.preprocess.packing import Sample

STREAMS = ("tokens", "loss_mask", "images")
FORMAT_NAME = "megatron_sail.packed"
FORMAT_VERSION = 1
META_COLUMNS = ("cols", "rows", "thumbnail", "width", "height", "sample")
VERIFY_LEVELS = ("cheap", "full", "structure")


def final_paths(prefix: str) -> list[str]:
    """Every file a complete dataset has, meta.json last."""
    paths = [f"{prefix}.{s}.{ext}" for s in STREAMS for ext in ("bin", "idx")]
    return paths + [f"{prefix}.images_meta.npy", f"{prefix}.rejects.jsonl", f"{prefix}.meta.json"]


def _builder(bin_path: str, dtype):
    """Megatron-Core's IndexedDatasetBuilder (imported lazily: megatron.core is slow to import)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    return IndexedDatasetBuilder(bin_path, dtype=dtype)


class PackedWriter:
    """Writes rows block by block; ``commit(meta)`` publishes, ``abort()`` removes everything.

    Use as a context manager: an exception inside the block aborts, so no partial dataset
    ever appears under the final names.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.tmp = f".tmp{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.removed_stale = remove_stale_temporaries(prefix)
        self._builders = {
            "tokens": _builder(self._path("tokens.bin"), np.int32),
            "loss_mask": _builder(self._path("loss_mask.bin"), np.uint8),
            "images": _builder(self._path("images.bin"), np.uint8),
        }
        for b in self._builders.values():  # the .bin checksums come free while writing
            b.data_file = integrity.HashingFile(b.data_file)
        # a detail may quote a lone surrogate from a hostile record: written escaped, never a crash
        self._rejects = open(self._path("rejects.jsonl"), "w", encoding="utf-8", errors="backslashreplace")
        self._image_meta: list[tuple[int, ...]] = []
        self.samples = 0
        self.rows = 0
        self.stats = {"tiles": 0, "text_tokens": 0, "image_tokens": 0, "loss_tokens": 0, "tokens": 0}
        self.blocks: list[list[int]] = []  # [block id, rows, rejects]
        self._block_rows = 0
        self._block_rejects = 0
        self._closed = False

    @property
    def num_images(self) -> int:
        """Images written so far."""
        return len(self._image_meta)

    def _path(self, name: str) -> str:
        return f"{self.prefix}.{name}{self.tmp}"

    def add_row(self, samples: list[Sample], img_context_id: int) -> None:
        """Append one packed row (its samples in order)."""
        lengths = [len(s) for s in samples]
        tokens = np.concatenate([s.tokens for s in samples])
        self._builders["tokens"].add_document(tokens, lengths)
        self._builders["loss_mask"].add_document(np.concatenate([s.loss_mask for s in samples]), lengths)
        blobs = [np.frombuffer(im.data, dtype=np.uint8) for s in samples for im in s.images]
        self._builders["images"].add_document(
            np.concatenate(blobs) if blobs else np.zeros(0, np.uint8), [b.size for b in blobs]
        )
        for k, s in enumerate(samples):
            for im in s.images:
                thumb = im.thumbnail and im.grid[0] * im.grid[1] > 1
                self._image_meta.append(
                    (im.grid[0], im.grid[1], int(thumb), im.size[0], im.size[1], self.samples + k)
                )
                self.stats["tiles"] += im.grid[0] * im.grid[1] + int(thumb)
        n_img = int(np.count_nonzero(tokens == img_context_id))
        self.stats["image_tokens"] += n_img
        self.stats["text_tokens"] += len(tokens) - n_img
        self.stats["tokens"] += len(tokens)
        self.stats["loss_tokens"] += int(sum(int(s.loss_mask.sum()) for s in samples))
        self.samples += len(samples)
        self.rows += 1
        self._block_rows += 1

    def add_reject(self, source: str, key: str, reason: str, detail: str) -> None:
        """Record one rejected input record."""
        line = {"source": source, "key": key, "reason": reason, "detail": detail}
        try:
            self._rejects.write(json.dumps(line, ensure_ascii=False) + "\n")
        except OSError as e:
            raise integrity.write_error(self._path("rejects.jsonl"), e) from None
        self._block_rejects += 1

    def end_block(self, block: int) -> None:
        """Close one packing block (the unit that merge_datasets interleaves)."""
        self.blocks.append([block, self._block_rows, self._block_rejects])
        self._block_rows = self._block_rejects = 0

    def _finalize_files(self) -> None:
        for name, b in self._builders.items():
            with _naming(self._path(f"{name}.idx")):
                b.finalize(self._path(f"{name}.idx"))
        with _naming(self._path("rejects.jsonl")):
            self._rejects.close()
        meta = np.asarray(self._image_meta, dtype=np.int32).reshape(-1, len(META_COLUMNS))
        with _naming(self._path("images_meta.npy")), open(self._path("images_meta.npy"), "wb") as f:
            np.save(f, meta)

    def commit(self, meta: dict) -> None:
        """Finish all files, record their checksums in meta.json, rename them into place, meta.json last."""
        self._finalize_files()
        names = [path[len(self.prefix) + 1 :] for path in final_paths(self.prefix)[:-1]]
        known = {
            f"{s}.bin": (b.data_file.bytes, b.data_file.hash.hexdigest()) for s, b in self._builders.items()
        }
        meta = {**meta, "checksums": integrity.checksums_block({n: self._path(n) for n in names}, known)}
        with _naming(self._path("meta.json")), open(self._path("meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.write("\n")
        # an older dataset under this prefix stops being "complete" before any of its files is
        # replaced, so a crash between the renames never leaves an old meta.json over new files
        stale = f"{self.prefix}.meta.json"
        if os.path.exists(stale):
            os.remove(stale)
        for path in final_paths(self.prefix):
            os.replace(path + self.tmp, path)
        self._closed = True

    def abort(self, keep_rejects: bool = False) -> Optional[OSError]:
        """Delete the temporary files (optionally publishing only the reject report).

        Survives a full disk: closing a file whose buffered tail cannot be written fails again
        with ENOSPC, so every close is tried, the first error is kept (and returned), and the
        temporaries are removed whatever happened. With ``keep_rejects`` a rejects file that
        could not be closed is not published, and the error is raised (one line, naming it)."""
        if self._closed:
            return None
        self._closed = True
        first: Optional[OSError] = None
        for close in [b.data_file.close for b in self._builders.values()] + [self._rejects_close]:
            try:
                close()
            except OSError as e:
                first = first or e
        for path in final_paths(self.prefix):
            try:
                if keep_rejects and path.endswith(".rejects.jsonl") and first is None:
                    os.replace(path + self.tmp, path)
                elif os.path.exists(path + self.tmp):
                    os.remove(path + self.tmp)
            except OSError as e:
                first = first or e
        if keep_rejects and first is not None:
            raise first
        return first

    def _rejects_close(self) -> None:
        try:
            self._rejects.close()
        except OSError as e:
            raise integrity.write_error(self._path("rejects.jsonl"), e) from None

    def __enter__(self) -> "PackedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._closed:
            self.abort()


class _naming:
    """Turns an OSError inside the block into one line naming ``path`` (integrity.write_error)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and isinstance(exc, OSError) and not isinstance(exc, integrity.OutputWriteError):
            raise integrity.write_error(self.path, exc) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(prefix: str) -> list[str]:
    """Remove ``PREFIX.<file>.tmp<PID>`` left by an earlier run of this prefix whose process is
    gone (killed, or its cleanup hit a full disk); a live writer's files are left alone."""
    removed = []
    for path in final_paths(prefix):
        folder, base = os.path.split(os.path.abspath(path))
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            pid = name[len(base) + 4 :] if name.startswith(base + ".tmp") else ""
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                try:
                    os.remove(os.path.join(folder, name))
                    removed.append(os.path.join(folder, name))
                except OSError:
                    pass
    return sorted(removed)


class PackedReader:
    """Memory-mapped access to one prefix's rows as raw arrays (dataset.py builds PackedRows).

    ``verify`` (integrity.py): 'cheap' (default; a cost independent of the number of rows:
    recorded sizes, digests of files up to 1 MiB, headers, end offsets, sampled entries),
    'full' (every digest and the full structure check), or 'structure' (the full structure
    check, no digests). A damaged file is a DatasetIntegrityError naming it; a dataset without
    recorded checksums gets the structure checks of its level.
    """

    def __init__(self, prefix: str, verify: str = "cheap"):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if verify not in VERIFY_LEVELS:
            raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
        meta_path = f"{prefix}.meta.json"
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{prefix}: no complete dataset (missing {meta_path})")
        self.meta = _read_meta(meta_path)
        if self.meta.get("format") != FORMAT_NAME or self.meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: not a {FORMAT_NAME} v{FORMAT_VERSION} dataset")
        self.prefix = prefix
        problems = integrity.check_files(prefix, self.meta, verify)
        if problems:
            raise integrity.DatasetIntegrityError("; ".join(problems))

        def open_stream(name: str, dtype) -> IndexedDataset:
            integrity.check_idx_header(f"{prefix}.{name}.idx", dtype)
            # an empty .bin (e.g. text-only data has no image bytes) cannot be memory-mapped
            empty = os.path.getsize(f"{prefix}.{name}.bin") == 0
            ds = IndexedDataset(f"{prefix}.{name}", mmap=not empty)
            check_stream(prefix, name, ds, np.dtype(dtype).itemsize)
            return ds

        check_stream, check_rows = (
            (integrity.check_stream_cheap, integrity.check_rows_cheap)
            if verify == "cheap"
            else (integrity.check_stream, integrity.check_rows)
        )

        self.tokens = open_stream("tokens", np.int32)
        self.loss_mask = open_stream("loss_mask", np.uint8)
        self.images = open_stream("images", np.uint8)
        self.image_meta = _load_image_meta(f"{prefix}.images_meta.npy")
        check_rows(prefix, self.tokens, self.loss_mask, self.images, self.image_meta)
        self.row_index = self.tokens.document_indices
        self.image_row_index = self.images.document_indices

    def __len__(self) -> int:
        return len(self.row_index) - 1

    @staticmethod
    def _slice(ds, a: int, b: int) -> list[np.ndarray]:
        return ds[int(a) : int(b)] if b > a else []

    def row(self, i: int) -> tuple[int, list[np.ndarray], list[np.ndarray], list[int]]:
        """(first sample id, token arrays, loss-mask arrays, image ids) of row i."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.prefix}: row {i} out of range [0, {len(self)})")
        a, b = self.row_index[i], self.row_index[i + 1]
        ia, ib = self.image_row_index[i], self.image_row_index[i + 1]
        return (
            int(a),
            self._slice(self.tokens, a, b),
            self._slice(self.loss_mask, a, b),
            list(range(int(ia), int(ib))),
        )

    def row_shape(self, i: int) -> tuple[list[int], int]:
        """(token length of each sample, image tiles) of row i, from the index arrays alone: no
        token or image bytes are read (the data-parallel balancer asks this for every row of a
        global batch on every rank)."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.prefix}: row {i} out of range [0, {len(self)})")
        a, b = self.row_index[i], self.row_index[i + 1]
        ia, ib = self.image_row_index[i], self.image_row_index[i + 1]
        lengths = self.tokens.sequence_lengths[a:b].tolist()
        grid = np.asarray(self.image_meta[ia:ib, :3], dtype=np.int64)
        n = grid[:, 0] * grid[:, 1]
        tiles = int((n + ((grid[:, 2] != 0) & (n > 1))).sum())
        return lengths, tiles

    def image_bytes(self, j: int) -> bytes:
        """Encoded bytes of image j."""
        return self.images[int(j)].tobytes()


def _read_meta(path: str) -> dict:
    """meta.json, or an error naming it when it is not valid JSON."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise integrity.DatasetIntegrityError(f"{path}: not valid JSON ({e}); the file is damaged") from e


def _load_image_meta(path: str) -> np.ndarray:
    """The image table (never unpickled), or an error naming the file; memory-mapped when it is
    large, so a rank's memory does not grow with the number of images."""
    try:
        mmap = "r" if os.path.getsize(path) > integrity.CHEAP_HASH_BYTES else None
        return np.load(path, mmap_mode=mmap, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise integrity.DatasetIntegrityError(f"{path}: not a readable .npy array ({e})") from e


def read_rejects(prefix: str) -> list[str]:
    """Reject report lines of a prefix."""
    with open(f"{prefix}.rejects.jsonl", "r", encoding="utf-8") as f:
        return f.readlines()


def load_meta(prefix: str) -> Optional[dict]:
    """meta.json of a prefix, or None when there is no complete dataset."""
    path = f"{prefix}.meta.json"
    if not os.path.exists(path):
        return None
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)
