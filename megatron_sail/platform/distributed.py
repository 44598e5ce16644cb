"""Start torch.distributed and Megatron-Core's parallel groups from one ParallelConfig.

NCCL when CUDA is present, gloo (plus the CPU backend of ``cpu.py``) otherwise. Works under
torchrun (env:// variables) and as a single process without any launcher.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from megatron_sail.config.parallel import ParallelConfig


def has_cuda() -> bool:
    """The single CPU-vs-GPU decision of the project."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """Device that model tensors live on (the CPU backend maps 'cuda' to it on CPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


def _free_port() -> int:
    """A free TCP port for a single-process rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(timeout_s: int = 600) -> None:
    """Init torch.distributed (once); single-process default when no launcher set the env."""
    if not has_cuda():
        from megatron_sail.platform import cpu

        cpu.install()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    from datetime import timedelta

    dist.init_process_group("nccl" if has_cuda() else "gloo", timeout=timedelta(seconds=timeout_s))


def initialize(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Start torch.distributed, Megatron-Core's model-parallel groups and the TP RNG tracker.

    The seed is shared by all ranks; Megatron derives the TP-rank-specific streams from it.
    """
    from megatron.core import parallel_state, tensor_parallel

    init_process_group()
    parallel.data_parallel_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down Megatron groups and the process group (tests call this between configs)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
