"""The CPU backend (platform/cpu.py): narrow patches, no global torch function mode, and the
foreach optimizer path it enables, against the per-tensor results they replace."""

import copy

import pytest
import torch

from megatron_sail.config.run import resolve

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend is CPU-only")


@pytest.fixture(scope="module")
def cpu_backend():
    """A world of one with the CPU backend installed (in this process, as the trainer does)."""
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.platform import cpu, distributed

    distributed.initialize(ParallelConfig())
    yield cpu
    distributed.shutdown()


def test_no_torch_function_mode_stays_on(cpu_backend):
    """After install nothing intercepts ordinary torch calls; a CUDA factory call outside the
    patched Megatron modules still fails as it would without the backend."""
    assert cpu_backend.installed()
    assert torch._C._len_torch_function_stack() == 0
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


def test_megatron_linear_layers_multiply_through_onednn(cpu_backend):
    """A TP=1 ColumnParallelLinear's forward and backward run OneDNNLinear (the wrapper is
    installed once) and give F.linear's output and gradients up to the summation order."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import layers

    from megatron_sail.platform import onednn_linear

    fn = layers.linear_with_grad_accumulation_and_async_allreduce
    assert fn.__wrapped__ is not None and not hasattr(fn.__wrapped__, "__wrapped__")
    cpu_backend._patch_linear()  # a second install does not wrap twice
    assert layers.linear_with_grad_accumulation_and_async_allreduce is fn
    if not onednn_linear.available():
        pytest.skip("torch built without oneDNN")
    cfg = ModelParallelConfig(params_dtype=torch.float32, use_cpu_initialization=True)
    layer = layers.ColumnParallelLinear(
        256, 512, config=cfg, init_method=torch.nn.init.xavier_uniform_, bias=True, gather_output=False
    )
    x = torch.randn(64, 2, 256, requires_grad=True)
    y, _ = layer(x)
    assert type(y.grad_fn).__name__ == "OneDNNLinearBackward"
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(y.square().sum(), (x, layer.weight, layer.bias))
    for a, b in zip(got, torch.autograd.grad(ref.square().sum(), (x, layer.weight, layer.bias))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_megatron_cuda_literals_land_on_the_cpu(cpu_backend):
    """Modules that allocate with device='cuda' get CPU tensors; their torch is otherwise torch."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    for module in (schedules, clip_grads):
        assert module.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
        assert module.torch.tensor([1.0], device="cuda").device.type == "cpu"
        assert module.torch.float32 is torch.float32 and module.torch.distributed is torch.distributed
    t = torch.ones(2)
    assert t.cuda() is t and t.pin_memory() is t


def test_cuda_type_names_only_where_megatron_checks_them(cpu_backend):
    """Tensor.type() keeps its CPU answer, except inside the wrapped Megatron functions."""
    from megatron.core.optimizer import clip_grads

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert p.type() == "torch.FloatTensor"
    with cpu_backend.cuda_type_names():
        assert p.type() == "torch.cuda.FloatTensor"
        assert p.type(torch.float64).dtype == torch.float64  # conversions unchanged
    assert p.type() == "torch.FloatTensor"
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)  # asserts cuda name
    assert torch.allclose(p.grad, torch.full((3,), 0.5), atol=1e-6)


def test_single_rank_collectives_return_at_once(cpu_backend):
    """With one rank: all-reduce/broadcast leave the tensor, gather/reduce-scatter copy it."""
    import torch.distributed as dist

    x = torch.arange(4.0)
    assert dist.all_reduce(x) is None and torch.equal(x, torch.arange(4.0))
    assert dist.all_reduce(x, async_op=True).wait()
    out = torch.empty(4)
    dist.all_gather_into_tensor(out, x)
    assert torch.equal(out, x)
    out2 = torch.empty(4)
    dist.reduce_scatter_tensor(out2, x)
    assert torch.equal(out2, x)


def test_foreach_norm_and_scale_match_megatrons_loops(cpu_backend):
    """The foreach grad-norm / scale fallbacks equal Megatron's per-tensor ones."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g) for n in (7, 300, 1, 4096)]
    want, _ = utils.local_multi_tensor_l2_norm(0, None, [grads], False)
    got, _ = clip_grads.l2_norm_impl(0, None, [grads], False)
    assert torch.allclose(got, want, rtol=1e-6)
    a, b = [x.clone() for x in grads], [x.clone() for x in grads]
    utils.local_multi_tensor_scale(0, None, [a, a], 0.3)
    clip_grads.multi_tensor_scale_impl(0, None, [b, b], 0.3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _train(steps: int, foreach: bool) -> list[torch.Tensor]:
    """Tiny recipe: build model, DDP and optimizer as the trainer does; ``steps`` updates with
    fixed random gradients; the parameters after them."""
    from megatron.core import tensor_parallel

    from megatron_sail import train as trainer
    from megatron_sail.training.optimizer import build_optimizer, torch_adams

    cfg = resolve(["--recipe", "tiny", "--train-iters", "3", "--lr", "1e-3"])
    torch.manual_seed(3)
    tensor_parallel.model_parallel_cuda_manual_seed(3)  # the same initial weights every call
    chunks = trainer.wrap_ddp(cfg, trainer.build_chunks(cfg, torch.float32))
    optimizer = build_optimizer(cfg.optim, chunks)
    inner = torch_adams(optimizer)
    assert inner and all(g["foreach"] for o in inner for g in o.param_groups)
    if not foreach:
        for o in inner:
            for group in o.param_groups:
                group["foreach"] = False
    params = [p for c in chunks for p in c.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        for p in params:
            p.main_grad.copy_(torch.randn(p.shape, generator=g))
        optimizer.step()
    return [copy.deepcopy(p.detach()) for p in params]


def test_foreach_adamw_equals_the_per_tensor_loop(cpu_backend):
    """build_optimizer turns on torch's foreach AdamW; three updates equal the per-tensor loop
    Megatron's fallback ran before, within fp32 rounding."""
    fast, slow = _train(3, True), _train(3, False)
    assert len(fast) == len(slow) > 10
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(fast, _train(0, True)))  # they did move
