"""How benchmark requests are split over data-parallel replicas (eval/replicas.py)."""

from megatron_sail.eval.replicas import ReplicaShare


def parts(n, size):
    return [ReplicaShare(r, size).slice(n) for r in range(size)]


def test_slices_are_contiguous_in_rank_order_and_cover_the_round():
    for size in (1, 2, 3, 4):
        for n in range(0, 40):
            got = parts(n, size)
            assert got[0][0] == 0 and got[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(got, got[1:]))  # gathered in rank order = order
            assert max(hi - lo for lo, hi in got) == -(-n // size)  # ceil(n / size) at most


def test_a_full_round_gives_each_replica_one_batch_and_a_short_one_about_half():
    assert parts(16, 2) == [(0, 8), (8, 16)]  # batch 8 x DP 2: the DP=1 batches exactly
    assert parts(5, 2) == [(0, 3), (3, 5)]
    assert parts(1, 2) == [(0, 1), (1, 1)]  # the other replica still takes part, with nothing
    assert parts(24, 3) == [(0, 8), (8, 16), (16, 24)]
