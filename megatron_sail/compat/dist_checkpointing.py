"""Internals of megatron-core's dist_checkpointing and torch DCP that the checkpoint writer uses.

Written for megatron-core 0.16.1 and torch 2.13 (see ``WORKAROUNDS`` in ``__init__.py``):

- ``sharded_key_groups``: Megatron's own ``torch_dist`` save first groups the flattened
  ShardedTensors by their global key (dropping non-main replicas) with a private helper; the
  synchronous and threaded writers do the same, so their files are ``torch_dist`` files.
- ``CallerQueue``: ``AsyncCallsQueue`` creates the caller that runs each scheduled save in its
  private ``_get_async_caller`` (0.16.1: a forked process or a persistent worker); the
  subclass lets the checkpoint code choose the caller class instead.
- ``wrapped_exception``: DCP hands a failed write to the finalizing step as its private
  "wrapped exception" result, which the coordinator re-raises on every rank.
- ``load_reader``: Megatron's ``torch_dist`` load strategy builds its DCP reader in a private
  module function; it is swapped for ``DirectFileSystemReader`` while a load runs.
- ``DirectFileSystemReader``: reads tensor items straight into their targets, using DCP's
  per-item storage records and the data offset torch's meta-device load records; asked to, it
  makes whole parameters views of the mapped file instead (loading for generation).
- ``align_tensor_items``: DCP's private ``_write_item`` (also imported by Megatron's async
  writer) starts each tensor item at a 64-byte boundary of its file, so the reader can map it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCaller, AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from torch.futures import Future


def sharded_key_groups(sharded_state_dict, keep_only_main_replica: bool) -> dict:
    """{global key: [ShardedBase, ...]}: the flattened state dict grouped by sharded key, only
    main replicas when ``keep_only_main_replica`` (what DCP's planner receives)."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys,
    )

    groups, _flat_mapping, _rename_mapping = _replace_state_dict_keys_with_sharded_keys(
        sharded_state_dict, keep_only_main_replica
    )
    return groups


class CallerQueue(AsyncCallsQueue):
    """Megatron's queue of pending asynchronous saves, whose calls run on ``caller_type``
    (an ``AsyncCaller`` subclass) instead of the forked process Megatron picks."""

    caller_type: type[AsyncCaller]
    """The caller class; subclasses set it."""

    def _get_async_caller(self) -> AsyncCaller:
        """One new caller per scheduled request (as 0.16.1's non-persistent path)."""
        return self.caller_type()


def wrapped_exception(error: BaseException):
    """A write result that carries ``error`` to DCP's finalization (re-raised there)."""
    from torch.distributed.checkpoint.utils import _wrap_exception

    return _wrap_exception(error)


@contextmanager
def load_reader(reader_type: type):
    """Megatron's ``torch_dist`` load strategy with ``reader_type`` as its DCP storage reader.

    0.16.1's ``TorchDistLoadShardedStrategy.load`` takes its reader from the module function
    ``_get_filesystem_reader``; it is replaced for the duration of the block (loads run on the
    main thread, one at a time)."""
    from megatron.core.dist_checkpointing.strategies import torch as strategies

    original = strategies._get_filesystem_reader
    strategies._get_filesystem_reader = lambda checkpoint_dir, cache_metadata=False: reader_type(
        checkpoint_dir
    )
    try:
        yield
    finally:
        strategies._get_filesystem_reader = original


def checkpoint_offset(meta_tensor) -> int | None:
    """Where the bytes of a tensor that ``torch.load(..., map_location="meta")`` described start
    in the stream it read (torch keeps it on the storage as ``_checkpoint_offset``); None when
    this torch does not record it."""
    return getattr(meta_tensor.untyped_storage(), "_checkpoint_offset", None)


@dataclasses.dataclass
class _DirectRead:
    """One tensor item to read in place: ``view`` (the target's bytes) from byte ``start``."""

    item: object
    target: torch.Tensor
    view: memoryview
    start: int


ITEM_ALIGN = 64
"""Byte boundary every tensor item of a shard file starts at (torch.save aligns the data inside
an item to 64 bytes of the item's start, so the data is then aligned in the file too)."""


_aligned_installed = False


def align_tensor_items() -> None:
    """Make DCP's writers (torch's ``FileSystemWriter`` and Megatron's
    ``FileSystemWriterAsync``, which calls torch's private ``_write_item`` through its own
    import) pad the file with zeros before each tensor item to a multiple of ``ITEM_ALIGN``.

    DCP records every item's offset and length, so the gaps are invisible to every reader, but
    the tensors' bytes land on aligned file offsets: ``DirectFileSystemReader`` can then make a
    parameter a view of the mapped file (an unaligned float32 view is refused). Installed once
    (checkpoint/dcp.py does it on import), so a later stand-in for ``_write_item`` (a test's
    monkeypatch) is never wrapped and left behind in Megatron's module."""
    global _aligned_installed
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch.distributed.checkpoint import filesystem

    if _aligned_installed:
        return
    _aligned_installed = True
    original = filesystem._write_item

    @functools.wraps(original)
    def aligned(transforms, stream, data, *args, **kwargs):
        if isinstance(data, torch.Tensor):
            pad = -stream.tell() % ITEM_ALIGN
            if pad:
                stream.write(bytes(pad))
        return original(transforms, stream, data, *args, **kwargs)

    filesystem._write_item = aligned
    filesystem_async._write_item = aligned


_SKIP = object()
"""``_direct``'s answer for an item that needs no read (its parameter now maps the file)."""


class DirectFileSystemReader(CachedMetadataFileSystemReader):
    """DCP's file reader that reads each tensor's bytes straight into the tensor it loads into.

    torch's ``FileSystemReader.read_data`` ``torch.load``s every item into a new tensor and then
    copies it into the target: two passes over the weights and a transient buffer of the
    largest tensor. Here an item is first loaded onto the meta device (the weights-only
    unpickler reads only its small pickle: dtype, shape, strides and the byte offset of its
    data), then, when the source rows and the target are plain contiguous CPU memory of the
    same dtype, its bytes are read into the target with ``os.preadv``. Anything else (bytes
    items, transformed items, GPU targets, strided slices) goes through torch's own path.

    The parameters of a freshly built model are untouched pages, and faulting them in one 4 KiB
    page at a time cost more than the copy itself (1.0 s of 1.3 s for 1.9 GB). So each target
    is first populated in one ``madvise(MADV_POPULATE_WRITE)`` call, on a helper thread ahead
    of the reads.

    With ``share`` ({data_ptr: parameter} of the model being loaded), an item that fills a whole
    parameter is not read at all: the parameter's ``.data`` becomes a view of the file, mapped
    copy-on-write (``mmap.ACCESS_COPY``), as transformers does with safetensors. Nothing is
    read until first use, the file's pages are shared with the page cache, and a write to the
    parameter copies only the page it touches, never the file. The state dict DCP returns
    still holds the old (unread) memory for those items; ``shared`` records them so the caller
    hands the parameter itself to ``load_state_dict`` (whose copy onto itself is a no-op)."""

    def __init__(self, checkpoint_dir, share: dict | None = None):
        super().__init__(checkpoint_dir)
        self.share = share or {}
        self.shared: set[int] = set()
        """ids of the parameters that became views of the file."""
        self._maps: dict[str, mmap.mmap] = {}

    def read_data(self, plan, planner):
        """Read this rank's items; returns DCP's completed future."""
        from torch.distributed.checkpoint.planner import LoadItemType

        per_file: dict[str, list] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            per_file.setdefault(info.relative_path, []).append(item)
        rest = []
        for relative_path, items in per_file.items():
            path = self.fs.concat_path(self.path, relative_path)
            items.sort(key=lambda it: self.storage_data[it.storage_index].offset)
            with self.fs.create_stream(path, "rb") as stream:
                reads = []
                for item in items:
                    info = self.storage_data[item.storage_index]
                    direct = None
                    if item.type != LoadItemType.BYTE_IO and not info.transform_descriptors:
                        direct = self._direct(stream, item, info, planner, path)
                    if direct is None:
                        rest.append(item)
                    elif direct is not _SKIP:
                        reads.append(direct)
                self._read_all(stream.fileno(), reads, planner, path)
        if rest:
            return super().read_data(dataclasses.replace(plan, items=rest), planner)
        done = Future()
        done.set_result(None)
        return done

    def _direct(self, stream, item, info, planner, path) -> _DirectRead | object | None:
        """Where one tensor item's bytes are and which bytes they fill; None when it does not
        qualify (read by torch's path instead), ``_SKIP`` when its parameter now maps the file."""
        from torch.distributed._shard._utils import narrow_tensor_by_index

        meta = torch.load(self._slice_file(stream, info), map_location="meta", weights_only=True)
        offset = checkpoint_offset(meta) if isinstance(meta, torch.Tensor) else None
        if offset is None or not meta.is_contiguous():
            return None
        source = narrow_tensor_by_index(meta, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != source.size():
            raise ValueError(
                f"{path}: item {item.storage_index} holds {tuple(source.size())}, "
                f"the model expects {tuple(target.size())}"
            )
        if not (
            source.is_contiguous()
            and target.is_contiguous()
            and target.device.type == "cpu"
            and target.dtype == meta.dtype
            and sys.byteorder == "little"
        ):
            return None
        start = info.offset + offset + source.storage_offset() * source.element_size()
        if self._share(path, stream, target, start):
            planner.commit_tensor(item, target)
            return _SKIP
        view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
        return _DirectRead(item, target, view, start)

    def _share(self, path: str, stream, target: torch.Tensor, start: int) -> bool:
        """Make the parameter ``target`` fills a view of its bytes in the mapped file; False when
        ``target`` is not a whole shared parameter or its bytes are not aligned for its dtype."""
        param = self.share.get(target.data_ptr())
        if (
            param is None
            or param.numel() != target.numel()  # (a layer's item has a leading layer axis)
            or param.dtype != target.dtype
            or not param.is_contiguous()
            or start % target.element_size()
        ):
            return False
        mm = self._maps.get(path)
        if mm is None:
            mm = self._maps[path] = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_COPY)
        if start + target.numel() * target.element_size() > len(mm):
            raise ValueError(f"{path}: truncated: a tensor of {tuple(target.shape)} needs bytes from {start}")
        param.data = torch.frombuffer(mm, dtype=target.dtype, count=target.numel(), offset=start).view(
            param.shape
        )
        self.shared.add(id(param))
        return True

    @staticmethod
    def _read_all(fd: int, reads: list[_DirectRead], planner, path) -> None:
        """Read every planned item; a helper thread populates the targets' pages ahead of the reads."""
        if not reads:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="populate") as pool:
            ready = [pool.submit(_populate, read.view) for read in reads]
            for k, read in enumerate(reads):
                ready[k].result()
                got = 0
                while got < len(read.view):
                    n = os.preadv(fd, [read.view[got:]], read.start + got)
                    if not n:
                        raise ValueError(
                            f"{path}: truncated at byte {read.start + got}: item "
                            f"{read.item.storage_index} needs {len(read.view)} bytes from byte {read.start}"
                        )
                    got += n
                planner.commit_tensor(read.item, read.target)


_PAGE = 4096
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; elsewhere madvise fails and pages fault in as usual


def _populate(view: memoryview) -> None:
    """Back the whole pages inside ``view`` with memory in one call (no per-page faults)."""
    if not sys.platform.startswith("linux") or len(view) < 16 * _PAGE:
        return
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    start = -(-address // _PAGE) * _PAGE
    end = (address + len(view)) // _PAGE * _PAGE
    _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_POPULATE_WRITE)


@functools.cache
def _libc():
    """The C library of this process (for madvise)."""
    return ctypes.CDLL(None, use_errno=True)
