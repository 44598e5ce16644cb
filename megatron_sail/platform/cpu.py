"""CPU backend: lets unmodified Megatron-Core code run on a machine without CUDA.

Megatron-Core assumes CUDA in many places: ``device="cuda"`` / ``torch.cuda.current_device()``
when allocating, the CUDA RNG state inside the tensor-parallel RNG tracker, stream and
synchronize calls, and ``param.type() == 'torch.cuda.FloatTensor'`` checks in the optimizers.
``install()`` redirects each of those to the CPU with a narrow patch, so the same model,
schedules, DDP and optimizer code runs on gloo, and no torch call outside those spots pays
anything (an earlier version kept a global ``TorchFunctionMode`` on, which put a Python call
in front of every torch op: 38k of them in one small decode):

* ``torch.cuda.*`` entry points (device, streams, events, RNG, memory stats) become CPU ones;
* the Megatron modules that allocate with a literal ``device="cuda"`` see a copy of the
  ``torch`` module whose factory functions map that device to the CPU (``_CUDA_LITERAL_MODULES``);
* ``Tensor.cuda()`` / ``Tensor.pin_memory()`` return the tensor (on a CUDA-less torch they
  could only raise);
* ``Tensor.type()`` reports CUDA type names only inside the Megatron functions that compare
  them (``_TYPE_CHECKING``);
* collectives over a group of one rank return at once (gloo would still round-trip them).
* Megatron's linear layers multiply through oneDNN in fp32 where a call is a plain product
  (``onednn_linear.py``: MKL's sgemm is 1.5-2.4x slower on this project's AMD EPYC machines).

``cuda_to_cpu()`` (the old mode, as a context manager) remains for code outside Megatron's
hot path that needs the general rewrite. This module is the only place in the project that
knows about the CPU/GPU difference (together with ``distributed.py``, which decides whether to
call it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False

_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing.mapping",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)
"""Megatron modules that allocate with ``device="cuda"`` (or hand "cuda" to a helper that does),
found by grepping megatron-core 0.16 and by tracing the CPU test suite."""

_TYPE_CHECKING = (
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    ("megatron.core.optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", None, "clip_grad_by_total_norm_fp32"),
)
"""(module, class or None, function): Megatron code that compares ``Tensor.type()`` with
'torch.cuda.*Tensor' names (parameter sorting at optimizer construction, the clip assert)."""

_FACTORIES = (
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "empty_strided",
    "linspace",
)
"""torch functions that take ``device=``."""


def _is_cuda(device) -> bool:
    """True for 'cuda', 'cuda:N', torch.device('cuda') and integer (CUDA ordinal) devices."""
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cuda_type_name(tensor, *args, **kwargs):
    """``Tensor.type()`` as a CUDA build reports it ('torch.cuda.FloatTensor'); with a target
    type it converts as usual."""
    name = _TENSOR_TYPE(tensor, *args, **kwargs)
    if args or kwargs or not isinstance(name, str) or ".cuda." in name:
        return name
    return name.replace("torch.", "torch.cuda.", 1)


_TENSOR_TYPE = torch.Tensor.type


@contextlib.contextmanager
def cuda_type_names():
    """While active, ``Tensor.type()`` names CPU tensors as CUDA ones (Megatron's optimizer
    checks compare against 'torch.cuda.FloatTensor'). Swaps one attribute: no per-op cost."""
    previous = torch.Tensor.type
    torch.Tensor.type = _cuda_type_name
    try:
        yield
    finally:
        torch.Tensor.type = previous


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU in every torch call made while active.

    Covers factory functions (``torch.empty(..., device='cuda')``), ``Tensor.to('cuda')``,
    ``Tensor.cuda()``, and ``Tensor.type()`` (reported as the CUDA type name). Every torch call
    inside pays a Python dispatch, so it is only for code off the hot path (``cuda_to_cpu``).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_to_cpu():
    """Map every CUDA device argument to the CPU inside the block (slow: per-op Python)."""
    with CudaToCpuMode():
        yield


def _cpu_factory(fn):
    """``fn`` with a CUDA ``device=`` mapped to the CPU."""

    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return factory


class _CpuTorch(types.ModuleType):
    """A copy of the ``torch`` namespace whose factory functions map CUDA devices to the CPU.

    Installed as the ``torch`` global of the Megatron modules in ``_CUDA_LITERAL_MODULES``:
    attribute lookups there stay plain dict lookups, only the factories gain a wrapper, and no
    other module sees a difference. Names torch creates lazily fall through to torch itself."""

    def __init__(self):
        super().__init__("torch", torch.__doc__)
        self.__dict__.update({k: v for k, v in vars(torch).items() if k not in ("__name__", "__doc__")})
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _patch_cuda_literals():
    """Give the Megatron modules that write ``device="cuda"`` the CPU-mapping torch namespace."""
    cpu_torch = _CpuTorch()
    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = cpu_torch


def _with_type_names(fn):
    """``fn`` run with ``Tensor.type()`` reporting CUDA names."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with cuda_type_names():
            return fn(*args, **kwargs)

    return wrapped


def _patch_type_checks():
    """Scope the CUDA type names to the Megatron functions that compare them."""
    for module_name, cls_name, fn_name in _TYPE_CHECKING:
        owner = importlib.import_module(module_name)
        if cls_name is not None:
            owner = getattr(owner, cls_name)
        setattr(owner, fn_name, _with_type_names(getattr(owner, fn_name)))


def _patch_tensor_methods():
    """``Tensor.cuda()`` and ``Tensor.pin_memory()`` return the tensor itself: without CUDA
    they could only raise, and Megatron calls them when moving loaded state and tied weights."""
    torch.Tensor.cuda = lambda self, *_a, **_k: self
    torch.Tensor.pin_memory = lambda self, *_a, **_k: self


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
        padded[: tensor.shape[0]] = tensor
        bufs = [torch.empty_like(padded) for _ in tensor_list]
        all_gather(bufs, padded, group=group)
        for out, buf in zip(tensor_list, bufs):
            out.copy_(buf[: out.shape[0]])
        return _DoneWork() if async_op else None

    def reduce_scatter_uneven(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not _uneven(input_list):
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        whole = torch.cat(list(input_list))
        dist.all_reduce(whole, op=op, group=group)
        rank = dist.get_rank(group)
        start = sum(p.shape[0] for p in input_list[:rank])
        output.copy_(whole[start : start + output.shape[0]])
        return _DoneWork() if async_op else None

    dist.all_gather = all_gather_uneven
    dist.reduce_scatter = reduce_scatter_uneven


def _patch_single_rank_collectives():
    """Collectives over a group of one rank return at once (their result is the input).

    Megatron issues them regardless of size (grad-norm and zero-count all-reduces over the
    model-parallel group, DDP's grad reduce-scatter, the distributed optimizer's param
    all-gather); gloo would still run each through its transport. With one rank, all-reduce
    and broadcast leave the tensor as is and gather / reduce-scatter are a copy."""
    import torch.distributed as dist

    def alone(group) -> bool:
        return dist.get_world_size(group) == 1

    def done(async_op):
        return _DoneWork() if async_op else None

    def in_place(original):
        @functools.wraps(original)
        def collective(tensor, *args, group=None, async_op=False, **kwargs):
            if alone(group):
                return done(async_op)
            return original(tensor, *args, group=group, async_op=async_op, **kwargs)

        return collective

    def copying(original):
        @functools.wraps(original)
        def collective(output, input, *args, group=None, async_op=False, **kwargs):
            if alone(group):
                if output.data_ptr() != input.data_ptr():
                    output.copy_(input.view_as(output))
                return done(async_op)
            return original(output, input, *args, group=group, async_op=async_op, **kwargs)

        return collective

    dist.all_reduce = in_place(dist.all_reduce)
    dist.broadcast = in_place(dist.broadcast)
    dist.all_gather_into_tensor = copying(dist.all_gather_into_tensor)
    dist.reduce_scatter_tensor = copying(dist.reduce_scatter_tensor)


def _patch_multi_tensor_fallbacks():
    """Megatron's no-Apex grad-norm and grad-scale fallbacks, with torch's foreach kernels.

    ``local_multi_tensor_l2_norm`` takes one ``torch.norm`` per tensor, gathers the results
    into a new tensor through Python floats and allocates with ``device="cuda"``;
    ``local_multi_tensor_scale`` multiplies tensor by tensor. The same arithmetic as one
    foreach call each (same per-tensor 2-norm, same product)."""
    from megatron.core.optimizer import clip_grads

    def l2_norm(_chunk_size, _noop_flag, tensor_lists, _per_tensor, *_args):
        tensors = tensor_lists[0]
        if not tensors:
            return torch.zeros(1), None
        norms = torch._foreach_norm(tensors, 2.0)
        return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None

    def scale(_chunk_size, _noop_flag, tensor_lists, factor):
        src, dst = tensor_lists[0], tensor_lists[1]
        if not src:
            return
        if all(a is b for a, b in zip(src, dst)):
            torch._foreach_mul_(dst, factor)
        else:
            torch._foreach_copy_(dst, torch._foreach_mul(src, factor))

    if clip_grads.multi_tensor_applier.__name__ == "local_multi_tensor_applier":
        clip_grads.l2_norm_impl = l2_norm
        clip_grads.multi_tensor_scale_impl = scale


def _patch_linear():
    """Megatron's linear layers multiply through oneDNN in fp32 where the call is a plain
    product (onednn_linear.py: 1.5-2.4x MKL's sgemm on AMD EPYC)."""
    from megatron.core.tensor_parallel import layers

    from megatron_sail.platform import onednn_linear

    current = layers.linear_with_grad_accumulation_and_async_allreduce
    if not hasattr(current, "__wrapped__"):
        layers.linear_with_grad_accumulation_and_async_allreduce = onednn_linear.megatron_linear(current)


def install() -> None:
    """Install the CPU backend once per process (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("CPU backend requested on a machine with CUDA; use the GPU path")
    _patch_torch_cuda()
    _patch_tensor_methods()
    _patch_cuda_literals()
    _patch_type_checks()
    _patch_megatron_rng()
    _patch_megatron_moe()
    _patch_uneven_collectives()
    _patch_single_rank_collectives()
    _patch_multi_tensor_fallbacks()
    _patch_linear()
    _INSTALLED = True


def installed() -> bool:
    """Whether ``install()`` ran in this process."""
    return _INSTALLED
