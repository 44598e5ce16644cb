"""platform/onednn_linear.py: large fp32 products through oneDNN, small ones through F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from megatron_sail.platform import onednn_linear

pytestmark = pytest.mark.skipif(not onednn_linear.available(), reason="torch built without oneDNN")


def _ops(fn) -> set[str]:
    """Names of the torch ops ``fn`` ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_large_product_goes_to_onednn_and_equals_f_linear_up_to_summation_order():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 768, generator=g) / 28
    b = torch.randn(1536, generator=g)
    for x in (torch.randn(8, 1, 768, generator=g), torch.randn(40, 768, generator=g)):
        assert x.numel() // 768 * w.numel() >= onednn_linear.MIN_MACS
        y = onednn_linear.linear(x, w, b)
        ref = F.linear(x, w, b)
        assert y.shape == ref.shape and y.dtype == torch.float32
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        assert "mkldnn::_linear_pointwise" in _ops(lambda x=x: onednn_linear.linear(x, w, b))
    # a transposed (non-contiguous) weight view and no bias
    wt = (torch.randn(768, 1536, generator=g) / 28).t()
    x = torch.randn(16, 768, generator=g)
    torch.testing.assert_close(onednn_linear.linear(x, wt), F.linear(x, wt), rtol=1e-5, atol=1e-5)


def test_small_products_single_rows_and_other_dtypes_stay_on_f_linear_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    small = torch.randn(128, 64, generator=g)
    x = torch.randn(8, 64, generator=g)
    assert torch.equal(onednn_linear.linear(x, small), F.linear(x, small))
    assert "mkldnn::_linear_pointwise" not in _ops(lambda: onednn_linear.linear(x, small))
    # one row needs twice the work: 896 x 4864 (4.4M multiply-adds) stays on MKL's gemv
    w = torch.randn(896, 4864, generator=g)
    row = torch.randn(1, 4864, generator=g)
    assert onednn_linear.MIN_MACS <= w.numel() < 2 * onednn_linear.MIN_MACS
    assert "mkldnn::_linear_pointwise" not in _ops(lambda: onednn_linear.linear(row, w))
    assert "mkldnn::_linear_pointwise" in _ops(lambda: onednn_linear.linear(row.expand(2, -1), w))
    big = torch.randn(2048, 2048, generator=g, dtype=torch.float64)
    xd = torch.randn(4, 2048, generator=g, dtype=torch.float64)
    assert torch.equal(onednn_linear.linear(xd, big), F.linear(xd, big))


def test_training_function_gradients_equal_f_linear_up_to_summation_order():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 2, 256, generator=g, requires_grad=True)
    w = (torch.randn(512, 256, generator=g) / 16).requires_grad_()
    b = torch.randn(512, generator=g, requires_grad=True)
    up = torch.randn(64, 2, 512, generator=g)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        y = onednn_linear.OneDNNLinear.apply(x, w, b)
        mine = torch.autograd.grad((y * up).sum(), (x, w, b))
    assert [e.name for e in prof.events()].count("mkldnn::_linear_pointwise") == 3  # y, dx, dw
    ref_y = F.linear(x, w, b)
    ref = torch.autograd.grad((ref_y * up).sum(), (x, w, b))
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    for a, r in zip(mine, ref):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    # the output can be modified in place before the backward (Megatron's cross entropy does)
    y = onednn_linear.OneDNNLinear.apply(x, w, b)
    y.sub_(y.max(-1, keepdim=True).values.detach())
    ref_y = F.linear(x, w, b)
    ref_y.sub_(ref_y.max(-1, keepdim=True).values.detach())
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad((y * up).sum(), (x, w, b))
    for a, r in zip(grads, torch.autograd.grad((ref_y * up).sum(), (x, w, b))):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    # no bias, frozen input
    y = onednn_linear.OneDNNLinear.apply(x.detach(), w, None)
    (gw,) = torch.autograd.grad(y.sum(), (w,))
    torch.testing.assert_close(
        gw, torch.autograd.grad(F.linear(x.detach(), w).sum(), (w,))[0], rtol=1e-4, atol=1e-3
    )


def test_megatron_linear_takes_plain_products_and_passes_the_rest_on():
    calls = []

    def original(*args):
        calls.append(args)
        return "megatron"

    original.warned = False  # Megatron's function keeps a flag on itself, read through its global
    fn = onednn_linear.megatron_linear(original)
    assert fn.__wrapped__ is original and fn.warned is False
    x, w = torch.randn(64, 1, 256), torch.randn(512, 256, requires_grad=True)
    y = fn(x, w, None, False, False, False, None, 0, None, None)
    assert isinstance(y, torch.Tensor) and y.grad_fn is not None and not calls
    assert type(y.grad_fn).__name__ == "OneDNNLinearBackward"
    for flags in ((True, False, False), (False, True, False), (False, False, True)):
        assert fn(x, w, None, *flags) == "megatron"
    assert fn(x, w, None, False, False, False, []) == "megatron"  # deferred weight gradients
    assert fn(x.double(), w.double(), None, False, False, False) == "megatron"
    assert len(calls) == 5 and calls[0][3:6] == (True, False, False)
