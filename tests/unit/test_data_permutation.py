"""The per-index permutation behind the blend: a bijection on [0, n), seeded, and well mixed."""

import time

import numpy as np
import pytest

import megatron_sail.data.loading.dataset as dataset_module
from megatron_sail.data.loading.dataset import BlendedDataset
from megatron_sail.data.loading.permutation import FeistelPermutation, derive_key


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 1000, 4097, 65537])
def test_every_index_has_exactly_one_image(n):
    perm = FeistelPermutation(n, derive_key(7, n))
    assert sorted(perm(i) for i in range(n)) == list(range(n))


def test_same_key_same_order_other_key_other_order():
    a, b, c = (
        FeistelPermutation(1000, k) for k in (derive_key(1, 0, 0), derive_key(1, 0, 0), derive_key(1, 0, 1))
    )
    order = lambda p: [p(i) for i in range(1000)]  # noqa: E731
    assert order(a) == order(b) and order(a) != order(c)
    assert derive_key(1, 2) != derive_key(2, 1)  # (seed, dataset) and (dataset, seed) differ


def test_orders_look_random():
    """Mean displacement of a uniform random permutation is n/3; no correlation with i or
    between neighbours; few fixed points. An affine map or an identity-like walk fails this."""
    n = 20011
    i = np.arange(n)
    for key in range(3):
        p = np.array([FeistelPermutation(n, derive_key(key))(k) for k in range(n)])
        assert abs(np.abs(p - i).mean() / n - 1 / 3) < 0.01
        assert abs(np.corrcoef(i, p)[0, 1]) < 0.03
        assert abs(np.corrcoef(p[:-1], p[1:])[0, 1]) < 0.03
        assert (p == i).sum() < 10
        assert len(np.unique(np.diff(p))) > n // 2  # not an arithmetic progression


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError):
        FeistelPermutation(0, 1)
    perm = FeistelPermutation(10, 1)
    for i in (-1, 10):
        with pytest.raises(IndexError):
            perm(i)


class _Rows:
    """A stand-in dataset that only has a length (the blend's arithmetic needs nothing else)."""

    seq_length = 16
    tokenizer_meta = None

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def _fake_blend(monkeypatch, lengths, weights=None):
    sizes = iter(lengths)
    monkeypatch.setattr(dataset_module, "PackedDataset", lambda prefix, verify="cheap": _Rows(next(sizes)))
    return BlendedDataset([f"p{d}" for d in range(len(lengths))], weights or [1.0] * len(lengths), seed=9)


def test_locate_is_cheap_with_many_long_sources(monkeypatch):
    """64 sources of 100M rows: the old code built a 100M-row permutation (~5 s, 800 MB) per
    source visit; now a row costs microseconds and nothing is materialized."""
    blend = _fake_blend(monkeypatch, [10**8] * 64)
    t0 = time.process_time()
    rows = [blend.locate(k) for k in range(20000)]
    assert time.process_time() - t0 < 10.0
    assert sorted({d for d, _ in rows}) == list(range(64))
    assert all(0 <= r < 10**8 for _, r in rows)
    assert len({(d, r) for d, r in rows}) == len(rows)  # first epoch: no row repeats


def test_every_epoch_of_every_source_is_covered_with_many_sources(monkeypatch):
    """More sources than the old cache of 8, unequal lengths and weights: each source's rows in
    each epoch are a permutation, epochs differ, and shares follow the weights."""
    lengths = [7, 13, 1, 40, 25, 9, 16, 3, 31, 11, 5, 19]
    weights = [float(1 + d % 4) for d in range(len(lengths))]
    blend = _fake_blend(monkeypatch, lengths, weights)
    total = 6000
    rows = [blend.locate(k) for k in range(total)]
    for d, n in enumerate(lengths):
        seq = [r for dd, r in rows if dd == d]
        assert abs(len(seq) - total * weights[d] / sum(weights)) <= 1
        epochs = [seq[e * n : (e + 1) * n] for e in range(len(seq) // n)]
        assert all(sorted(e) == list(range(n)) for e in epochs)
        if n >= 5:
            assert len({tuple(e) for e in epochs}) > 1


def test_state_names_the_order_rule_and_refuses_another(monkeypatch):
    blend = _fake_blend(monkeypatch, [10, 20])
    blend.position = 5
    state = blend.state_dict()
    assert state["order"] == BlendedDataset.ORDER
    other = _fake_blend(monkeypatch, [10, 20])
    other.load_state_dict(state)
    assert other.position == 5
    old = {k: v for k, v in state.items() if k != "order"}  # written before the key existed
    other.load_state_dict(old)
    with pytest.raises(ValueError, match="order"):
        other.load_state_dict({**state, "order": "numpy-permutation"})
