"""Megatron-Core distributed checkpoints that save the same way on CPU/gloo and on GPUs.

megatron-core 0.16.1's default ``torch_dist`` save strategy always goes through its async writer
(``FileSystemWriterAsync``), which first starts a ``multiprocessing`` Manager for a results queue
and then forks one writer process per bucket. On CPU/gloo that start-up hung. The format itself
is fine: it is torch.distributed.checkpoint (DCP) files plus Megatron's metadata. So saving here
keeps Megatron's translation of ShardedTensors to DCP and its save planner, and hands the result
to DCP's plain synchronous ``FileSystemWriter`` (no subprocesses, no Manager). The checkpoint is
byte-compatible with ``torch_dist`` version 1: Megatron's default loader reads it, at any TP/PP,
and checkpoints written by Megatron's own strategy load here.

Asynchronous saves (``--async-save``) use the same translation and planner, then split the
write the way Megatron-LM does: the saving step plans collectively and copies every tensor to new
host memory (``HostCopyWriter``); a thread of this process writes the files while training goes
on; finalization (all ranks done, ``.metadata`` and ``metadata.json`` by rank 0) runs later on the
main thread through Megatron's ``AsyncCallsQueue``. Megatron's own caller forks writer processes
and starts a multiprocessing Manager (which hung here; see docs/training.md); a thread needs
neither and behaves the same on CPU and GPU.

This module is the one place that chooses the strategy; conversion and the trainer both use it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCaller, AsyncRequest
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.state_dict_saver import (
    save_state_dict_async_finalize,
    save_state_dict_async_plan,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    mcore_to_pyt_state_dict,
)
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.planner import WriteItemType

from megatron_sail.checkpoint import disk_full, integrity
from megatron_sail.checkpoint.layout import MCORE_METADATA
from megatron_sail.compat.dist_checkpointing import (
    CallerQueue,
    DirectFileSystemReader,
    align_tensor_items,
    load_reader,
    sharded_key_groups,
    wrapped_exception,
)

log = logging.getLogger(__name__)
align_tensor_items()  # once, before any save: tensor items start at 64-byte file offsets


@dataclass(frozen=True)
class DistCkptConfig:
    """How model checkpoints are written and read."""

    thread_count: int = 1
    """Writer threads per rank (DCP threads, not processes); each adds one file per rank."""
    fully_parallel_save: bool = False
    """Spread the writing of data-parallel replicas over the DP ranks (large multi-node runs)."""
    validate_access_integrity: bool = True
    """Check on save that every shard is written exactly once across ranks."""
    strict_load: bool = True
    """Load fails when the checkpoint lacks a tensor the model asks for."""
    verify: str = "auto"
    """Before loading, check the files against manifest.json (checkpoint/integrity.py): auto,
    sizes, full, or off (the caller verified already). DCP's pickled .metadata is always
    checked against its allow-list first, so a crafted one cannot run code."""


class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """``torch_dist`` v1 writer that writes in the calling process: synchronously (``save``) or
    from a thread after a host copy (``async_save``); never in forked processes."""

    def __init__(self, thread_count: int = 1):
        super().__init__("torch_dist", 1, keep_only_main_replica=True, thread_count=thread_count)

    def _to_dcp(self, sharded_state_dict) -> tuple[dict, MCoreSavePlanner]:
        """Megatron ShardedTensors as a DCP state dict, and the planner that saves it."""
        sharded_state_dict = sharded_key_groups(sharded_state_dict, self.keep_only_main_replica)
        planner = MCoreSavePlanner(
            dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
        )
        return mcore_to_pyt_state_dict(sharded_state_dict, False), planner

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        """Translate Megatron ShardedTensors to DCP and write them with FileSystemWriter."""
        pyt_state_dict, planner = self._to_dcp(sharded_state_dict)
        writer = NamingFileSystemWriter(
            str(checkpoint_dir), thread_count=self.thread_count, single_file_per_rank=True
        )
        torch.distributed.checkpoint.save(pyt_state_dict, storage_writer=writer, planner=planner)

    def async_save(self, sharded_state_dict, checkpoint_dir) -> AsyncRequest:
        """Collective planning and the host copy now; the request's ``async_fn`` writes the
        files, its finalize function gathers the results and writes ``.metadata``."""
        pyt_state_dict, planner = self._to_dcp(sharded_state_dict)
        writer = HostCopyWriter(str(checkpoint_dir), thread_count=self.thread_count)
        planned = save_state_dict_async_plan(pyt_state_dict, writer, None, 0, planner=planner)[0]
        return AsyncRequest(writer.write, (), [lambda: save_state_dict_async_finalize(*planned)])


def _full_disk_named(err: BaseException, folder: str, plan) -> BaseException:
    """This rank's write failure as "no space left on device while writing FILE (N bytes free)"
    when a full disk is why; else ``err``. Made here, on the rank that wrote: the ENOSPC is the
    context of torch's errno-less zip-writer error only until DCP pickles it for the other
    ranks. FILE is this rank's newest shard file (the one being written)."""
    prefix = getattr(getattr(plan, "storage_data", None), "prefix", None)
    shards = (
        [e for e in os.scandir(folder) if prefix and e.name.startswith(prefix)]
        if os.path.isdir(folder)
        else []
    )
    newest = max(shards, key=lambda e: e.stat().st_mtime_ns).path if shards else folder
    return disk_full.explain(err, newest) or err


class NamingFileSystemWriter(FileSystemWriter):
    """DCP's file writer whose full-disk failure names the file (``_full_disk_named``)."""

    def write_data(self, plan, planner):
        """Write this rank's files; a full disk raises the one-line error."""
        try:
            return super().write_data(plan, planner)
        except Exception as e:  # noqa: BLE001 - re-raised, named when a full disk is why
            raise _full_disk_named(e, str(self.path), plan) from None


class HostCopyWriter(FileSystemWriterAsync):
    """DCP file writer for asynchronous saves, in two halves.

    ``prepare_write_data`` (in the saving step) resolves every write item and copies its tensor
    into new host memory, so training may update the originals right after. ``write`` (in the
    background thread) hands those copies to DCP's ordinary file writer: same files, same
    layout as a synchronous save. Results or the exception are kept for finalization."""

    def prepare_write_data(self, plan, planner) -> None:
        """Stage this rank's data: bytes items as they are, tensors as host copies."""
        self._plan = plan
        self._staged = {
            item.index: _host_copy(planner.resolve_data(item))
            if item.type != WriteItemType.BYTE_IO
            else planner.resolve_data(item)
            for item in plan.items
        }
        self._results = wrapped_exception(RuntimeError("checkpoint write did not run"))

    def write(self) -> None:
        """Write the staged data (background thread); never raises, finalization reports."""
        try:
            staged = _StagedPlanner(self._staged)
            self._results = FileSystemWriter.write_data(self, self._plan, staged).wait()
        except BaseException as e:  # noqa: BLE001 - handed to every rank at finalization
            self._results = wrapped_exception(_full_disk_named(e, str(self.path), self._plan))
        self._staged = {}

    def retrieve_write_results(self):
        """What ``write`` produced: the write results, or the wrapped exception."""
        return self._results


class _StagedPlanner:
    """Stands in for the save planner while writing: data comes from the staged copies."""

    def __init__(self, staged: dict):
        self.staged = staged

    def resolve_data(self, item):
        """The staged copy of one write item."""
        data = self.staged[item.index]
        if item.type == WriteItemType.BYTE_IO:
            data.seek(0)
        return data


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy in new host memory (a device-to-host copy on GPU)."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    out.copy_(tensor.detach())
    return out


class ThreadAsyncCaller(AsyncCaller):
    """Megatron's AsyncCaller contract (collective done-check, join) with the write running in
    a daemon thread of this process: if the process dies, the half-written files stay behind
    in the temporary folder and nothing is finalized."""

    def __init__(self):
        self.thread: threading.Thread | None = None

    def schedule_async_call(self, async_req: AsyncRequest) -> None:
        """Start the write (nothing to start when this rank writes nothing)."""
        if async_req.async_fn is None:
            return
        self.thread = threading.Thread(
            target=async_req.async_fn,
            args=async_req.async_fn_args,
            kwargs=async_req.async_fn_kwargs,
            daemon=True,
            name="checkpoint-writer",
        )
        self.thread.start()

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        """True when every rank's write has finished (after waiting for it when blocking)."""
        alive = int(self.thread is not None and self.thread.is_alive())
        done = (not alive) if no_dist else bool(self.sync_all_async_calls(alive))
        if done or blocking:
            self.close()
            done = True
        return done

    def close(self, abort: bool = False) -> None:
        """Wait for the thread (a thread cannot be killed; ``abort`` waits too)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def __del__(self):
        pass


class ThreadAsyncCallsQueue(CallerQueue):
    """Megatron's queue of pending saves (schedule, then ``maybe_finalize_async_calls`` on all
    ranks: non-blocking at step boundaries, blocking before the next save and before exit),
    running each save on a thread caller instead of a forked process."""

    caller_type = ThreadAsyncCaller


def save_strategy(cfg: DistCkptConfig = DistCkptConfig()):
    """The save strategy used for every checkpoint of the project."""
    strategy = SyncTorchDistSaveStrategy(cfg.thread_count)
    if cfg.fully_parallel_save and dist.get_world_size() > 1:
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper,
        )

        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    return strategy


def save_sharded(
    sharded_state_dict: dict,
    checkpoint_dir: str | os.PathLike,
    cfg: DistCkptConfig = DistCkptConfig(),
    content_metadata: dict | None = None,
    async_save: bool = False,
) -> AsyncRequest | None:
    """Collective: write a sharded state dict into ``checkpoint_dir`` (created if missing).

    With ``async_save`` only the planning and the host copy happen here; the returned request
    goes to ``ThreadAsyncCallsQueue.schedule_async_request`` and is complete (``metadata.json``
    written) once finalized. Not atomic by itself: callers write into a temporary directory
    and rename it (see ``save_model``; the trainer does the same for its iteration folders).
    Tensor items start at 64-byte file offsets (``align_tensor_items``, installed on import),
    so a load for generation can map them.
    """
    if dist.get_rank() == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
    dist.barrier()
    return dist_checkpointing.save(
        sharded_state_dict,
        str(checkpoint_dir),
        sharded_strategy=save_strategy(cfg),
        validate_access_integrity=cfg.validate_access_integrity,
        content_metadata=content_metadata,
        async_sharded_save=async_save,
    )


def load_sharded(
    sharded_state_dict: dict,
    checkpoint_dir: str | os.PathLike,
    cfg: DistCkptConfig = DistCkptConfig(),
    allow_extra: bool = False,
    share: dict | None = None,
    shared: set | None = None,
) -> dict:
    """Collective: read the tensors ``sharded_state_dict`` describes; returns plain tensors.

    ``allow_extra`` accepts a checkpoint that holds more than is asked for (a training
    checkpoint's optimizer state when only the weights are wanted); a requested tensor the
    checkpoint lacks is still an error under ``cfg.strict_load``. ``share`` ({data_ptr:
    parameter}) lets whole parameters become copy-on-write views of the file
    (``DirectFileSystemReader``); the ids of those that did are added to ``shared``.
    """
    if not (Path(checkpoint_dir) / MCORE_METADATA).is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir}: not a Megatron distributed checkpoint (no {MCORE_METADATA})"
        )
    if cfg.verify != "off":
        verified = integrity.verify_checkpoint(str(checkpoint_dir), cfg.verify)
        if verified == "none" and dist.get_rank() == 0:  # generate, convert: as the trainer says
            log.warning(f"{checkpoint_dir}: {integrity.VERIFIED_NOTE['none']}")
    metadata = integrity.check_dcp_metadata(str(checkpoint_dir))
    _no_needless_zeroing(sharded_state_dict, metadata)
    if not cfg.strict_load:
        strict = "assume_ok_unexpected"
    else:
        strict = "raise_unexpected" if allow_extra else "raise_all"
    readers: list[DirectFileSystemReader] = []

    def reader(path):  # tensors read into the parameters (or mapped), no buffer
        readers.append(DirectFileSystemReader(path, share))
        return readers[-1]

    with load_reader(reader):
        loaded = dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir), strict=strict)
    if shared is not None:
        for r in readers:
            shared |= r.shared
    return loaded


def _no_needless_zeroing(sharded_state_dict: dict, metadata) -> None:
    """Megatron zeroes every tensor marked ``allow_shape_mismatch`` (embedding, output layer:
    the vocabulary may be padded differently) before reading it, in case the checkpoint's is
    smaller. Where the checkpoint holds the same global shape that zeroing is a wasted pass
    over the largest tensor (0.2 s of a 0.5B model's load), so the mark is dropped."""
    sizes = {
        key: tuple(md.size)
        for key, md in getattr(metadata, "state_dict_metadata", {}).items()
        if hasattr(md, "size")
    }
    for leaf in _leaves(sharded_state_dict):
        if getattr(leaf, "allow_shape_mismatch", False) and sizes.get(leaf.key) == tuple(leaf.global_shape):
            leaf.allow_shape_mismatch = False


def model_keys(n: int) -> list[str]:
    """Top-level keys of ``n`` model chunks in a checkpoint dict: 'model' for one chunk,
    'model0', 'model1', ... for virtual-pipeline chunks."""
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict:
    """{'model': sd} for one chunk, {'model0': ..., 'model1': ...} for virtual-pipeline chunks.

    Tensor keys inside are global (layer numbers include the pipeline offset), so a checkpoint
    saved with one chunk layout loads into any other.
    """
    chunks = unwrap_model(list(model_chunks))
    return {key: c.sharded_state_dict() for key, c in zip(model_keys(len(chunks)), chunks)}


def save_model(
    model_chunks: list[torch.nn.Module],
    checkpoint_dir: str | os.PathLike,
    cfg: DistCkptConfig = DistCkptConfig(),
    overwrite: bool = False,
) -> Path:
    """Collective: save model weights only, atomically (temporary folder, then rename by rank 0)."""
    final = Path(checkpoint_dir)
    tmp = final.parent / f".{final.name}.tmp"
    # Every rank checks (the checkpoint folder is on a shared file system), so all of them
    # raise together instead of the others waiting at the barrier for rank 0.
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"{final}: exists and is not empty")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_sharded(model_sharded_state_dict(model_chunks), tmp, cfg)
    integrity.write_manifest(str(tmp))
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def _leaves(value) -> list:
    """The sharded tensors/objects inside an entry (a built factory nests them in lists)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _leaves(v)]
    return [value]


def _pieces_in_place(part: dict) -> tuple[dict, dict]:
    """Each ShardedTensorFactory whose pieces are views of its tensor (SwiGLU's [gate; up]) is
    replaced by those pieces: DCP then reads them straight into the parameter. Left as a
    factory, Megatron would read the pieces into them too but then concatenate them into a new
    tensor for load_state_dict to copy back (0.44x the weights of a 0.5B model at once).
    Returns the new entries and {key: parameter} of the replaced ones."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out, filled = {}, {}
    for key, value in part.items():
        if isinstance(value, ShardedTensorFactory) and isinstance(value.data, torch.Tensor):
            built = value.build()
            pieces = _leaves(built)
            base = value.data.untyped_storage().data_ptr()
            if (
                pieces
                and all(isinstance(p, ShardedTensor) and p.data is not None for p in pieces)
                and all(p.data.untyped_storage().data_ptr() == base for p in pieces)
                and sum(p.data.numel() for p in pieces) == value.data.numel()
            ):
                out[key], filled[key] = built, value.data
                continue
        out[key] = value
    return out, filled


def _sharded_keys(value) -> set:
    """Checkpoint keys an entry reads (a stacked layer tensor is one key over all layers)."""
    return {getattr(v, "key", None) for v in _leaves(value)} - {None}


def _largest_first(sharded: dict) -> tuple[dict, dict]:
    """Split {chunk: {key: entry}} into the entries of this rank's largest checkpoint tensors
    (at least half the size of its biggest; all entries of one checkpoint key together, as DCP
    reads a key whole) and everything else.

    On CPU our reader (``DirectFileSystemReader``) reads contiguous items straight into the
    parameter; torch's own path (GPU targets, strided slices) reads each tensor into a buffer
    before copying it, so loading the embedding last would hold it twice on top of a nearly full
    model. Read first, while the other parameters are still untouched (unallocated) pages, it
    costs nothing at the peak, and the remaining transients are one layer's tensor."""
    size: dict[str, int] = {}
    for part in sharded.values():
        for value in part.values():
            for v in _leaves(value):
                data = getattr(v, "data", None)
                if isinstance(data, torch.Tensor) and getattr(v, "key", None):
                    size[v.key] = max(size.get(v.key, 0), data.numel())
    cut = max(size.values(), default=0) / 2
    large = {k for k, n in size.items() if n and n >= cut}
    big, rest = {}, {}
    for name, part in sharded.items():
        big[name], rest[name] = {}, {}
        for key, value in part.items():
            keys = _sharded_keys(value)
            (big if keys and keys <= large else rest)[name][key] = value
    return big, rest


def load_model(
    model_chunks: list[torch.nn.Module],
    checkpoint_dir: str | os.PathLike,
    cfg: DistCkptConfig = DistCkptConfig(),
    map_file: bool = False,
) -> None:
    """Collective: load weights into the chunks (at whatever TP/PP they were built with).

    Works on model-only checkpoints (conversions) and on training checkpoints, whose optimizer
    state is left unread. ``map_file`` (loading for generation on CPU): a parameter the file
    holds whole and contiguous becomes a copy-on-write view of the mapped file instead of a
    copy (read on first use, as transformers' safetensors loading); the others are read.
    """
    chunks = unwrap_model(list(model_chunks))
    share = (
        {p.data_ptr(): p for c in chunks for p in c.parameters() if p.device.type == "cpu"}
        if map_file
        else None
    )
    shared: set[int] = set()
    sharded, filled = {}, {}
    for name, part in model_sharded_state_dict(model_chunks).items():
        sharded[name], filled[name] = _pieces_in_place(part)
    big, rest = _largest_first(sharded)
    loaded = load_sharded(big, checkpoint_dir, cfg, allow_extra=True, share=share, shared=shared)
    later = load_sharded(
        rest,
        checkpoint_dir,
        dataclasses.replace(cfg, verify="off"),
        allow_extra=True,
        share=share,
        shared=shared,
    )
    for name, part in later.items():  # also the checkpoint's common entries (its optimizer's)
        loaded.setdefault(name, {}).update(part)
        loaded[name].update(filled.get(name, {}))  # read in place already: the parameters themselves
    for name, chunk in zip(model_keys(len(chunks)), chunks):
        if shared:  # mapped parameters: hand over the parameter itself (its copy onto itself is a no-op)
            for key, param in chunk.named_parameters():
                if id(param) in shared and key in loaded[name]:
                    loaded[name][key] = param
        chunk.load_state_dict(loaded[name], strict=True)
