"""Start torch.distributed and Megatron-Core's parallel groups from one ParallelConfig.

NCCL when CUDA is present, gloo (plus the CPU backend of ``cpu.py``) otherwise. Works under
torchrun (env:// variables), under ``srun`` with one task per GPU (rank and rendezvous from
SLURM's variables, see slurm.py), and as a single process without any launcher (an in-process
store, no port, nothing written to the environment).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.platform import slurm

log = logging.getLogger(__name__)


def has_cuda() -> bool:
    """The single CPU-vs-GPU decision of the project."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """Device that model tensors live on (the CPU backend maps 'cuda' to it on CPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


def launch_env() -> bool:
    """Fill torchrun's variables when no launcher set them, from an srun step (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID, first node of the node list; MASTER_PORT if set, else 29500).
    Returns True for a lone process (no launcher, no srun step): it joins a world of one through
    an in-process store and leaves the environment alone, so that the programs it starts (a
    conversion, a preprocessing run) do not inherit a rank and a port this process holds.
    Warns when SLURM counts more tasks than we join."""
    lone = False
    if "RANK" not in os.environ:
        derived = slurm.rendezvous_from_slurm(os.environ)
        if derived is not None:
            os.environ.update(derived)
        else:
            lone = True
    world = int(os.environ.get("WORLD_SIZE", "1")) if not lone else 1
    message = slurm.single_process_warning(os.environ, world)
    if message:
        log.warning(message)
    return lone


def init_process_group(timeout_minutes: float = 10) -> None:
    """Init torch.distributed (once); ``timeout_minutes`` bounds every collective (Megatron-LM's
    --distributed-timeout-minutes), so a lost rank fails the job instead of hanging it."""
    lone = launch_env() if not dist.is_initialized() else False
    if not has_cuda():
        from megatron_sail.platform import cpu

        cpu.install()
    else:  # srun --gpus-per-task=1 shows each task one device, whatever its local rank
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if dist.is_initialized():
        return
    from datetime import timedelta

    backend = "nccl" if has_cuda() else "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    if lone:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)


def initialize(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Start torch.distributed, Megatron-Core's model-parallel groups and the TP RNG tracker.

    The seed is shared by all ranks; Megatron derives the TP-rank-specific streams from it.
    """
    from megatron.core import parallel_state, tensor_parallel

    init_process_group(parallel.distributed_timeout_minutes)
    parallel.data_parallel_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        expert_model_parallel_size=parallel.ep,
        distributed_timeout_minutes=int(parallel.distributed_timeout_minutes),
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
