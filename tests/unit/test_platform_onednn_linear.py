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
