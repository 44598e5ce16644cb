"""Blending: weights, determinism, epochs, resumable position; Megatron-style data paths."""

import numpy as np
import pytest

from megatron_sail.config.data import PackingConfig, PreprocessConfig
from megatron_sail.config.images import TilingConfig
from megatron_sail.data.loading.dataset import BlendedDataset, PackedDataset, build_blended, parse_data_path
from megatron_sail.data.preprocess.pipeline import run
from megatron_sail.demo.generator import DemoConfig, make_demo


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    demo = make_demo(str(root / "demo"), DemoConfig(samples=60, val_samples=20, seed=1))
    out = []
    for name in ("train", "val"):
        cfg = PreprocessConfig(
            inputs=[demo[name]],
            output_prefix=str(root / name),
            tokenizer=demo["tokenizer"],
            tiling=TilingConfig(32, 1, 2, True, 4),
            packing=PackingConfig(128, 16, 0),
        )
        assert run(cfg, log=lambda m: None)[0] == 0
        out.append(str(root / name))
    return out


def test_parse_data_path_forms():
    assert parse_data_path("0.3 a 0.7 b") == (["a", "b"], [0.3, 0.7])
    assert parse_data_path(["2", "a", "1", "b"]) == (["a", "b"], [2.0, 1.0])
    assert parse_data_path("a b") == (["a", "b"], [1.0, 1.0])
    assert parse_data_path(["a"]) == (["a"], [1.0])
    # a quoted flag value arrives as one list item: same meaning as the separate words
    assert parse_data_path(["0.3 a 0.7 b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ValueError):
        parse_data_path("0.3 a b")
    with pytest.raises(ValueError):
        parse_data_path("")


def test_weights_are_followed_exactly_per_prefix_of_the_stream(prefixes):
    blend = BlendedDataset(prefixes, [3.0, 1.0], seed=5)
    picks = np.array([blend.locate(k)[0] for k in range(400)])
    for n in (4, 40, 400):
        assert abs(int((picks[:n] == 0).sum()) - 0.75 * n) <= 1
    assert blend.weights == [0.75, 0.25]


def test_each_epoch_of_a_dataset_is_a_permutation(prefixes):
    blend = BlendedDataset(prefixes, [1.0, 1.0], seed=5)
    n1 = len(blend.datasets[1])
    rows = [blend.locate(k) for k in range(6 * n1)]
    from_1 = [r for d, r in rows if d == 1]
    assert sorted(from_1[:n1]) == list(range(n1)) and sorted(from_1[n1 : 2 * n1]) == list(range(n1))
    assert from_1[:n1] != from_1[n1 : 2 * n1]  # a new order each epoch
    assert blend.locate(10**9)[0] in (0, 1)  # any position is addressable, cheaply


def test_stream_is_deterministic_and_seeded(prefixes):
    a = BlendedDataset(prefixes, [1.0, 2.0], seed=5)
    b = build_blended(f"1 {prefixes[0]} 2 {prefixes[1]}", seed=5)
    c = BlendedDataset(prefixes, [1.0, 2.0], seed=6)
    seq = lambda d: [d.locate(k) for k in range(60)]  # noqa: E731
    assert seq(a) == seq(b) and seq(a) != seq(c)
    ra, rb = a[17], b[17]
    assert np.array_equal(ra.tokens, rb.tokens) and [i.data for i in ra.images] == [i.data for i in rb.images]
    assert a.tokenizer_meta == PackedDataset(prefixes[0]).tokenizer_meta


def test_resume_from_state_dict_continues_the_same_stream(prefixes):
    a = BlendedDataset(prefixes, [1.0, 1.0], seed=3)
    it = iter(a)
    for _ in range(7):
        next(it)
    state = a.state_dict()
    expected = [next(it) for _ in range(3)]
    b = BlendedDataset(prefixes, [1.0, 1.0], seed=3)
    b.load_state_dict(state)
    got = [next(iter(b)) for _ in range(1)] + [b[b.position], b[b.position + 1]]
    for x, y in zip(expected, got):
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.loss_mask, y.loss_mask)
    assert state["position"] == 7
    with pytest.raises(ValueError, match="seed"):
        BlendedDataset(prefixes, [1.0, 1.0], seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="weights"):
        BlendedDataset(prefixes, [2.0, 1.0], seed=3).load_state_dict(state)


def test_bad_blends_are_refused(prefixes, tmp_path):
    with pytest.raises(ValueError):
        BlendedDataset(prefixes, [1.0], seed=0)
    with pytest.raises(ValueError):
        BlendedDataset(prefixes, [0.0, 0.0], seed=0)
    with pytest.raises(FileNotFoundError, match="no complete dataset"):
        BlendedDataset([str(tmp_path / "none")], [1.0])
