"""Safetensors shards mapped into memory: tensors that are views of the files, not copies.

``hf_io.read_state_dict`` copies every tensor into new memory, which is right for a conversion
that keeps the whole state dict, but loading a model for generation then holds the model, the
file's copy and the converted copies at once (2.6x the weights for a 0.5B model). Here each
shard is ``mmap``-ed and every tensor is a ``torch.frombuffer`` view of its bytes: nothing is
read until used, and ``release`` hands the pages of tensors already copied into the model back
to the page cache (``MADV_DONTNEED``; they are clean file pages, so they leave this process's
resident set), so a streaming load peaks near the model's own size.

The file format is the documented one (8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}``, then the data); every offset is checked against the
file before a view is made, and a bad file is named with the reason.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable

import torch

from megatron_sail.convert.hf_io import SAFETENSORS_INDEX, safetensors_files

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_PAGE = mmap.PAGESIZE


class MappedCheckpoint:
    """Every tensor of a checkpoint folder (sharded or not) as a view of its mmap-ed file."""

    def __init__(self, hf_dir: str | os.PathLike):
        root = Path(hf_dir)
        self.state: dict[str, torch.Tensor] = {}
        self._maps: list[mmap.mmap] = []
        self._ranges: dict[int, tuple[mmap.mmap, int, int]] = {}
        for shard, expected in safetensors_files(root).items():
            path = root / shard
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in {SAFETENSORS_INDEX} is missing")
            self._map_file(path, expected)

    def _map_file(self, path: Path, expected: list[str]) -> None:
        """Map one file and make a view per tensor it holds."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ValueError(f"{path}: cannot read safetensors file (only {size} bytes)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._maps.append(mm)
        (n,) = struct.unpack("<Q", mm[:8])
        if 8 + n > size:
            raise ValueError(f"{path}: cannot read safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(bytes(mm[8 : 8 + n]))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read safetensors file (header: {e})") from e
        header.pop("__metadata__", None)
        missing = sorted(set(expected) - set(header))
        if missing:
            raise ValueError(f"{path}: tensors listed in the index are missing: {missing[:5]}")
        for name, info in header.items():
            if name in self.state:
                raise ValueError(f"{path}: tensor {name!r} appears in more than one shard")
            self.state[name] = self._view(path, mm, 8 + n, size, name, info)

    def _view(self, path: Path, mm: mmap.mmap, base: int, size: int, name: str, info) -> torch.Tensor:
        """The tensor ``name`` as a view of the mapped bytes, after checking its entry."""
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: tensor {name!r} has a bad header entry ({e!r})") from e
        count = 1
        for d in shape:
            count *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if start < 0 or end != start + count * itemsize or base + end > size:
            raise ValueError(
                f"{path}: tensor {name!r} data [{start}, {end}) does not match its "
                f"shape {shape} x {itemsize} bytes within the {size}-byte file"
            )
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start).view(shape)
        self._ranges[t.data_ptr()] = (mm, base + start, base + end)
        return t

    def release(self, tensors: Iterable[torch.Tensor]) -> None:
        """Drop the pages behind these views (or views of them) from this process's memory;
        reading them again faults them back in from the file."""
        for t in tensors:
            hit = self._ranges.get(t.untyped_storage().data_ptr())
            if hit is None:
                continue
            mm, start, end = hit
            lo = start - start % _PAGE
            mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)

    def close(self) -> None:
        """Forget the views and unmap the files (views still referenced elsewhere keep their map
        alive until they go)."""
        self.state.clear()
        self._ranges.clear()
        self._maps.clear()
