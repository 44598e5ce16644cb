"""Megatron-Core distributed checkpoints that save the same way on CPU/gloo and on GPUs.

megatron-core 0.16.1's default ``torch_dist`` save strategy always goes through its async writer
(``FileSystemWriterAsync``), which first starts a ``multiprocessing`` Manager for a results queue
and then forks one writer process per bucket. On CPU/gloo that start-up hung. The format itself
is fine: it is torch.distributed.checkpoint (DCP) files plus Megatron's metadata. So saving here
keeps Megatron's translation of ShardedTensors to DCP and its save planner, and hands the result
to DCP's plain synchronous ``FileSystemWriter`` (no subprocesses, no Manager). The checkpoint is
byte-compatible with ``torch_dist`` version 1: Megatron's default loader reads it, at any TP/PP,
and checkpoints written by Megatron's own strategy load here.

This module is the one place that chooses the strategy; conversion and the trainer both use it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint import FileSystemWriter


@dataclass
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


class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """``torch_dist`` v1 writer that saves synchronously in the calling process."""

    def __init__(self, thread_count: int = 1):
        super().__init__("torch_dist", 1, keep_only_main_replica=True, thread_count=thread_count)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        """Translate Megatron ShardedTensors to DCP and write them with FileSystemWriter."""
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        writer = FileSystemWriter(str(checkpoint_dir), thread_count=self.thread_count,
                                  single_file_per_rank=True)
        planner = MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                   flatten_state_dict=False)
        torch.distributed.checkpoint.save(pyt_state_dict, storage_writer=writer, planner=planner)


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


def save_sharded(sharded_state_dict: dict, checkpoint_dir: str | os.PathLike,
                 cfg: DistCkptConfig = DistCkptConfig(), content_metadata: dict | None = None) -> None:
    """Collective: write a sharded state dict into ``checkpoint_dir`` (created if missing).

    Not atomic by itself: callers write into a temporary directory and rename it (see
    ``save_model``; the trainer does the same for its iteration folders).
    """
    if dist.get_rank() == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded_state_dict, str(checkpoint_dir), sharded_strategy=save_strategy(cfg),
                            validate_access_integrity=cfg.validate_access_integrity,
                            content_metadata=content_metadata)


def load_sharded(sharded_state_dict: dict, checkpoint_dir: str | os.PathLike,
                 cfg: DistCkptConfig = DistCkptConfig(), allow_extra: bool = False) -> dict:
    """Collective: read the tensors ``sharded_state_dict`` describes; returns plain tensors.

    ``allow_extra`` accepts a checkpoint that holds more than is asked for (a training
    checkpoint's optimizer state when only the weights are wanted); a requested tensor the
    checkpoint lacks is still an error under ``cfg.strict_load``.
    """
    if not (Path(checkpoint_dir) / "metadata.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: not a Megatron distributed checkpoint (no metadata.json)")
    if not cfg.strict_load:
        strict = "assume_ok_unexpected"
    else:
        strict = "raise_unexpected" if allow_extra else "raise_all"
    return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir), strict=strict)


def model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict:
    """{'model': sd} for one chunk, {'model0': ..., 'model1': ...} for virtual-pipeline chunks.

    Tensor keys inside are global (layer numbers include the pipeline offset), so a checkpoint
    saved with one chunk layout loads into any other.
    """
    chunks = unwrap_model(list(model_chunks))
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_model(model_chunks: list[torch.nn.Module], checkpoint_dir: str | os.PathLike,
               cfg: DistCkptConfig = DistCkptConfig(), overwrite: bool = False) -> Path:
    """Collective: save model weights only, atomically (temporary folder, then rename by rank 0)."""
    final = Path(checkpoint_dir)
    tmp = final.parent / f".{final.name}.tmp"
    if dist.get_rank() == 0:
        if final.exists() and any(final.iterdir()) and not overwrite:
            raise FileExistsError(f"{final}: exists and is not empty")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_sharded(model_sharded_state_dict(model_chunks), tmp, cfg)
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load_model(model_chunks: list[torch.nn.Module], checkpoint_dir: str | os.PathLike,
               cfg: DistCkptConfig = DistCkptConfig()) -> None:
    """Collective: load weights into the chunks (at whatever TP/PP they were built with).

    Works on model-only checkpoints (conversions) and on training checkpoints, whose optimizer
    state is left unread.
    """
    loaded = load_sharded(model_sharded_state_dict(model_chunks), checkpoint_dir, cfg,
                          allow_extra=True)
    chunks = unwrap_model(list(model_chunks))
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"], strict=True)
        return
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"], strict=True)
