"""CPU backend: lets unmodified Megatron-Core code run on a machine without CUDA.

Megatron-Core assumes CUDA in many places: ``device="cuda"`` / ``torch.cuda.current_device()``
when allocating, the CUDA RNG state inside the tensor-parallel RNG tracker, stream and
synchronize calls, and ``param.type() == 'torch.cuda.FloatTensor'`` checks in the optimizers.
``install()`` redirects all of those to the CPU so the same model, schedules, DDP and optimizer
code runs on gloo. It is the only place in the project that knows about the CPU/GPU difference
(together with ``distributed.py``, which decides whether to call it).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE: "CudaToCpuMode | None" = None


def _is_cuda(device) -> bool:
    """True for 'cuda', 'cuda:N', torch.device('cuda') and integer (CUDA ordinal) devices."""
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU in every torch call made while active.

    Covers factory functions (``torch.empty(..., device='cuda')``), ``Tensor.to('cuda')``,
    ``Tensor.cuda()``, and ``Tensor.type()`` (reported as the CUDA type name so Megatron's
    optimizer dtype checks accept CPU parameters).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to, torch.Tensor.pin_memory):
            if func is torch.Tensor.pin_memory:
                return args[0]
            args = tuple("cpu" if i > 0 and _is_cuda(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


class _FakeStream:
    """Stands in for a CUDA stream: CPU work is already ordered, so every call is a no-op."""

    def wait_stream(self, *_a, **_k):
        """No-op: CPU ops run in program order."""

    def wait_event(self, *_a, **_k):
        """No-op: CPU ops run in program order."""

    def synchronize(self):
        """No-op: CPU ops are synchronous."""

    def record_event(self, *_a, **_k):
        """Returns a fake event."""
        return _FakeEvent()


class _FakeEvent:
    """Stands in for a CUDA event."""

    def __init__(self, *_a, **_k):
        pass

    def record(self, *_a, **_k):
        """No-op."""

    def wait(self, *_a, **_k):
        """No-op."""

    def synchronize(self):
        """No-op."""

    def query(self):
        """Always complete."""
        return True

    def elapsed_time(self, _other):
        """Timing through CUDA events is unavailable on CPU."""
        return 0.0


def _patch_torch_cuda():
    """Replace the torch.cuda entry points Megatron-Core calls with CPU equivalents."""
    cuda = torch.cuda
    # A CPU device object works both as `device=` argument and inside threads (autograd) where
    # the TorchFunctionMode below is not active.
    cuda.current_device = lambda: torch.device("cpu")
    cuda.set_device = lambda *_a, **_k: None
    cuda.device_count = lambda: 1
    cuda.synchronize = lambda *_a, **_k: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda *_a, **_k: _FakeStream()
    cuda.default_stream = lambda *_a, **_k: _FakeStream()
    cuda.Stream = _FakeStream
    cuda.Event = _FakeEvent
    cuda.stream = lambda *_a, **_k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *_a, **_k: 0
    cuda.max_memory_allocated = lambda *_a, **_k: 0
    cuda.memory_reserved = lambda *_a, **_k: 0
    cuda.get_rng_state = lambda *_a, **_k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *_a, **_k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))


def _patch_megatron_rng():
    """Point the tensor-parallel RNG tracker at the CPU generator.

    The tracker saves/restores "CUDA" RNG states around dropout and init in parallel regions;
    on CPU the default CPU generator plays that role, so forking behaves the same way.
    """
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *_a, **_k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *_a, **_k: torch.set_rng_state(state)
    # The tracker warns when the CPU state changes inside a fork; here that is the design.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


def _patch_megatron_moe():
    """Give Megatron's MoE token dispatcher its all-to-all split sizes as host numbers.

    The alltoall dispatcher computes the per-rank split sizes on the device and moves them to
    the host with ``maybe_move_tensor_to_cpu(..., as_numpy=True)``, which only converts CUDA
    tensors; on CPU they stayed tensors, and gloo's ``all_to_all_single`` refuses tensor split
    sizes. CPU tensors asked for as numpy become numpy arrays here, as GPU ones already do."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def to_host(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = to_host
    token_dispatcher.maybe_move_tensor_to_cpu = to_host


class _DoneWork:
    """Stands in for the work handle of a collective that already completed."""

    def wait(self, *_a, **_k):
        """Nothing to wait for."""
        return True

    def is_completed(self):
        """Always complete."""
        return True


def _patch_uneven_collectives():
    """List-form ``all_gather`` / ``reduce_scatter`` with parts of different lengths on gloo.

    Megatron's MoE dispatcher under TP gathers (and in backward reduce-scatters) a different
    number of routed tokens per TP rank; NCCL takes uneven parts, gloo refuses them ("invalid
    tensor size"). Uneven calls become equal-sized ones here: gather parts padded to the
    longest along dim 0, or all-reduce the concatenated parts and keep this rank's slice.
    Equal-sized calls are passed through untouched."""
    import torch.distributed as dist

    all_gather, reduce_scatter = dist.all_gather, dist.reduce_scatter

    def _uneven(parts) -> bool:
        """Parts that differ in length (dim 0) and only there."""
        shapes = {tuple(p.shape) for p in parts}
        return len(shapes) > 1 and len({sh[1:] for sh in shapes}) == 1

    def all_gather_uneven(tensor_list, tensor, group=None, async_op=False):
        if not _uneven([*tensor_list, tensor]):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(p.shape[0] for p in tensor_list)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        bufs = [torch.empty_like(padded) for _ in tensor_list]
        all_gather(bufs, padded, group=group)
        for out, buf in zip(tensor_list, bufs):
            out.copy_(buf[:out.shape[0]])
        return _DoneWork() if async_op else None

    def reduce_scatter_uneven(output, input_list, op=dist.ReduceOp.SUM, group=None,
                              async_op=False):
        if not _uneven(input_list):
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        whole = torch.cat(list(input_list))
        dist.all_reduce(whole, op=op, group=group)
        rank = dist.get_rank(group)
        start = sum(p.shape[0] for p in input_list[:rank])
        output.copy_(whole[start:start + output.shape[0]])
        return _DoneWork() if async_op else None

    dist.all_gather = all_gather_uneven
    dist.reduce_scatter = reduce_scatter_uneven


def install() -> None:
    """Install the CPU backend once per process (idempotent)."""
    global _INSTALLED, _MODE
    if _INSTALLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("CPU backend requested on a machine with CUDA; use the GPU path")
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_megatron_moe()
    _patch_uneven_collectives()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    _INSTALLED = True


def installed() -> bool:
    """Whether ``install()`` ran in this process."""
    return _INSTALLED
