"""Data-parallel balancing (training/balance.py, BatchPlan with row costs) and the index-only
row shapes it reads (PackedReader.row_shape)."""

from __future__ import annotations

import random

import pytest

from megatron_sail.bench.balance import write_source
from megatron_sail.config.recipes import model_recipe
from megatron_sail.data.indexed import PackedReader
from megatron_sail.data.loading.dataset import PackedDataset, build_blended
from megatron_sail.training import balance
from megatron_sail.training.flops import real_seqlens, shape_from_model_config
from megatron_sail.training.loop import BatchPlan, row_flops


def test_assign_is_an_even_partition_and_beats_contiguous():
    rng = random.Random(0)
    for dp, per in ((2, 1), (2, 4), (8, 4), (8, 8), (3, 5)):
        for _ in range(20):
            costs = [rng.choice([1.0, 1.0, 1.3, 2.5, 3.7]) * rng.uniform(0.9, 1.1) for _ in range(dp * per)]
            ranks = balance.assign(costs, dp, per)
            assert sorted(i for r in ranks for i in r) == list(range(dp * per))
            assert all(len(r) == per and r == sorted(r) for r in ranks)
            assert ranks == balance.assign(list(costs), dp, per)  # deterministic
            assert balance.straggler(costs, ranks) <= balance.straggler(
                costs, balance.contiguous(dp * per, dp)
            )


def test_assign_finds_the_even_split():
    # contiguous: [10, 10] vs [1, 1]; balanced: one heavy and one light row per rank
    assert balance.assign([10.0, 10.0, 1.0, 1.0], 2, 2) == [[0, 2], [1, 3]]
    # largest-first alone ends at 12 / 14 ([8, 4, 0] / [6, 5, 3]); the swap pass reaches 13 / 13
    costs = [8.0, 6.0, 5.0, 4.0, 3.0, 0.0]
    ranks = balance.assign(costs, 2, 3)
    assert balance.straggler(costs, ranks) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cannot split"):
        balance.assign([1.0] * 5, 2, 3)


def test_batch_plan_balanced_covers_the_global_batch():
    costs = {k: float((k * 7919) % 13) for k in range(200)}
    for dp, mbs, gbs in ((2, 1, 4), (4, 2, 16), (2, 3, 12)):
        plans = [BatchPlan(gbs, mbs, dp, r, costs.__getitem__) for r in range(dp)]
        for step in range(3):
            got = []
            for p in plans:
                mbs_rows = [p.microbatch(step, m) for m in range(p.num_microbatches)]
                assert all(len(rows) == mbs for rows in mbs_rows)
                got += [i for rows in mbs_rows for i in rows]
            assert sorted(got) == list(range(step * gbs, (step + 1) * gbs))
    # one rank: the contiguous order whatever the costs
    assert BatchPlan(4, 1, 1, 0, costs.__getitem__).microbatch(1, 2) == [6]


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """A few rows of the SAIL-VL-shaped vision source (bench/balance.py)."""
    prefix = str(tmp_path_factory.mktemp("mix") / "vision")
    write_source(prefix, 24, 4096, seed=3, vision=True)
    return prefix


def test_row_shape_equals_the_read_row(mix, tiny_demo):
    for prefix in (mix, tiny_demo["train"]):
        ds, reader = PackedDataset(prefix), PackedReader(prefix)
        for i in range(len(ds)):
            row = ds[i]
            lengths, tiles = reader.row_shape(i)
            assert lengths == real_seqlens(row.cu_seqlens, row.num_samples), (prefix, i)
            assert tiles == sum(img.num_tiles for img in row.images), (prefix, i)
    assert len({reader.row_shape(i)[1] for i in range(len(reader))}) > 1  # the demo rows differ


def test_balancing_moves_rows_of_the_demo_run(tiny_demo):
    """The DP=2 trainer test (tests/distributed/test_train_runs.py, dp2: balanced by default)
    compares with the single-rank curve; here: its global batches are indeed reassigned."""
    from megatron_sail.config.recipes import get_recipe

    blend = build_blended(tiny_demo["train"], seed=7)
    cfg = get_recipe("tiny")("sft-knowledge")
    cost = row_flops(blend, shape_from_model_config(cfg.model, cfg.images.tile_size))
    moved = sum(BatchPlan(4, 1, 2, 0, cost).rank_rows(s) != [4 * s, 4 * s + 1] for s in range(20))
    assert moved >= 3, moved
    sail = shape_from_model_config(model_recipe("sail_2b"))
    assert row_flops(blend, sail)(0) > 0
