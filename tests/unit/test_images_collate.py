"""Micro-batch assembly and the prefetching loader (PIL backend: runs without DALI)."""

import itertools
import time

import numpy as np
import pytest
import torch

from megatron_sail.config.images import ImageConfig
from megatron_sail.data.images.pil import PilPipeline
from megatron_sail.data.images.synthetic import encode
from megatron_sail.data.loading.collate import collate_rows
from megatron_sail.data.loading.prefetch import PrefetchLoader
from megatron_sail.data.records import ImageRecord, PackedRow

S = 16
IMG = 99  # image-context token id used in these rows
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def solid(value: int, grid=(1, 1), sample=0, source="d:0") -> ImageRecord:
    """A lossless one-colour image, so every tile it yields says which image it came from."""
    data = encode(np.full((S * grid[1], S * grid[0], 3), value, np.uint8), "PNG")
    return ImageRecord(data, grid, True, (S * grid[0], S * grid[1]), sample, source)


def row(n: int, lengths: list[int], images: list[ImageRecord], seed: int = 0) -> PackedRow:
    """A packed row of samples with the given lengths (+ padding to n) holding ``images``."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1000, 2000, n)
    cu = np.concatenate([[0], np.cumsum(lengths)])
    for s, a in enumerate(cu[:-1]):
        k = sum(img.num_tiles for img in images if img.sample == s) * 4
        tokens[a + 1 : a + 1 + k] = IMG
    if cu[-1] < n:
        cu = np.append(cu, n)
    return PackedRow(
        tokens=tokens.astype(np.int64),
        labels=np.roll(tokens, -1).astype(np.int64),
        loss_mask=np.ones(n, np.float32),
        cu_seqlens=cu.astype(np.int32),
        num_samples=len(lengths),
        images=images,
    )


@pytest.fixture(scope="module")
def pipe():
    p = PilPipeline(ImageConfig(backend="pil", tile_size=S, threads=2))
    yield p
    p.close()


def expected(value: int) -> torch.Tensor:
    return (torch.full((3, S, S), value / 255.0) - MEAN) / STD


def test_tiles_follow_image_order_across_rows(pipe):
    r0 = row(
        40, [20, 12], [solid(10, (2, 1), 0, "a:0"), solid(20, (1, 1), 0, "a:1"), solid(30, (1, 2), 1, "a:2")]
    )
    r1 = row(40, [40], [solid(40, (3, 1), 0, "b:0")])
    mb = collate_rows([r0, r1], pipe, image_token_id=IMG, tokens_per_tile=4)
    values = [10] * 3 + [20] + [30] * 3 + [40] * 4  # grid tiles then thumbnail, image by image
    assert mb.num_images == 4 and mb.num_tiles == len(values) == mb.tiles.shape[0]
    for t, v in zip(mb.tiles, values):
        assert torch.allclose(t, expected(v), atol=1e-5)
    assert mb.tokens.shape == (2, 40) and mb.tokens.dtype == torch.int64
    assert mb.cu_seqlens.dtype == torch.int32
    assert mb.cu_seqlens.tolist() == [0, 20, 32, 40, 80]
    assert mb.max_seqlen == 40 and mb.decode_failures == 0


def test_failed_image_masks_only_its_sample(pipe):
    broken = ImageRecord(b"\xff\xd8garbage", (1, 1), True, (S, S), 1, "bad:5")
    r0 = row(32, [10, 14], [solid(50, (1, 1), 0, "a:0"), broken])
    r1 = row(32, [32], [solid(60, (1, 1), 0, "a:1")])
    mb = collate_rows([r0, r1], pipe)
    assert mb.decode_failures == 1 and mb.failed_sources == ["bad:5"]
    assert mb.loss_mask[0, :10].eq(1).all() and mb.loss_mask[0, 10:24].eq(0).all()
    assert mb.loss_mask[0, 24:].eq(1).all() and mb.loss_mask[1].eq(1).all()
    assert mb.tiles.shape[0] == 3 and torch.all(mb.tiles[1] == 0)
    assert torch.allclose(mb.tiles[2], expected(60), atol=1e-5)


def test_bad_rows_are_rejected_with_their_name(pipe):
    r = row(16, [16], [solid(1, (1, 1), 0, "x:3")])
    with pytest.raises(ValueError, match=r"row 1 \(first image x:3\).*image tokens"):
        collate_rows([row(16, [16], []), r], pipe, image_token_id=IMG, tokens_per_tile=5)
    r.cu_seqlens = np.array([0, 9], np.int32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        collate_rows([r], pipe)
    with pytest.raises(ValueError, match="sample 3"):
        collate_rows([row(16, [16], [solid(1, (1, 1), 3, "x:4")])], pipe)
    with pytest.raises(ValueError, match="shape"):
        collate_rows([row(16, [16], []), row(12, [12], [])], pipe)


def batches() -> list[list[PackedRow]]:
    """Eight micro-batches of two rows; one image is broken, so masking is part of the state."""
    out = []
    for k in range(8):
        imgs = [solid(10 * k + 1, (k % 3 + 1, 1), 0, f"s:{k}")]
        if k == 5:
            imgs.append(ImageRecord(b"junk", (1, 1), True, (S, S), 1, "s:bad"))
        out.append([row(48, [30, 18], imgs, seed=k), row(48, [48], [], seed=100 + k)])
    return out


def same(a, b) -> bool:
    return (
        torch.equal(a.tiles, b.tiles)
        and torch.equal(a.tokens, b.tokens)
        and torch.equal(a.loss_mask, b.loss_mask)
        and torch.equal(a.cu_seqlens, b.cu_seqlens)
    )


def test_prefetch_is_deterministic_and_resumable(pipe):
    data = batches()
    source = lambda p: itertools.islice(data, p, None)  # noqa: E731
    with PrefetchLoader(source, pipe, depth=3) as loader:
        full = list(loader)
        assert loader.position == 8
    assert len(full) == 8 and full[5].decode_failures == 1
    assert all(same(mb, collate_rows(rows, pipe)) for mb, rows in zip(full, data))
    with PrefetchLoader(source, pipe, depth=1) as loader:
        first = [next(loader) for _ in range(3)]
        state = loader.state_dict()
    assert state == {"position": 3} and all(same(a, b) for a, b in zip(first, full))
    with PrefetchLoader(source, pipe, depth=2, position=state["position"], pin_memory=True) as resumed:
        rest = list(resumed)
    assert len(rest) == 5 and all(same(a, b) for a, b in zip(rest, full[3:]))


def test_row_stats_ride_on_their_micro_batch_also_after_resume(pipe):
    """The loader's ``row_stats`` result is attached to the micro-batch built from the same rows
    (the trainer's throughput metrics read it there); a batch without the hook carries zeros."""
    data = batches()
    source = lambda p: itertools.islice(data, p, None)  # noqa: E731
    stats = lambda rows: (float(sum(r.num_samples for r in rows)), float(sum(len(r.images) for r in rows)))  # noqa: E731
    with PrefetchLoader(source, pipe, depth=2, position=3, row_stats=stats) as loader:
        got = [(mb.real_tokens, mb.flops) for mb in loader]
    assert got == [stats(rows) for rows in data[3:]]
    assert got[2] == (3.0, 2.0)  # micro-batch 5: samples 2 + 1, images 2 (one of them junk)
    with PrefetchLoader(source, pipe, depth=1) as plain:
        first = next(plain)
    assert (first.real_tokens, first.flops) == (0.0, 0.0)


def test_prefetch_raises_worker_errors_in_order(pipe):
    data = batches()[:2] + [[row(16, [16], []), row(20, [20], [])]]
    loader = PrefetchLoader(lambda p: iter(data[p:]), pipe, depth=2)
    next(loader), next(loader)
    with pytest.raises(ValueError, match="row 1"):
        next(loader)
    with pytest.raises(StopIteration):
        next(loader)
    loader.close()


def test_prefetch_runs_ahead_and_closes_while_full(pipe):
    data = batches()
    loader = PrefetchLoader(lambda p: iter(data[p:]), pipe, depth=2)
    deadline = time.monotonic() + 10
    while not loader._queue.full() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert loader._queue.qsize() == 2 and loader.position == 0  # ready ahead of any request
    loader.close()
    assert not loader._thread.is_alive()


class _TimedPipe:
    """Wraps a pipeline; each call sleeps like a slow decoder and records when it ran."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay, self.calls = inner, delay, []

    def tiles(self, records):
        t0 = time.monotonic()
        time.sleep(self.delay)
        out = self.inner.tiles(records)
        self.calls.append((t0, time.monotonic()))
        return out


def test_prefetch_decodes_while_the_step_computes(pipe):
    """Decoding of micro-batch k+1 runs during the (simulated) training step on micro-batch k."""
    data, delay = batches()[:6], 0.1
    timed = _TimedPipe(pipe, delay)
    steps = []
    start = time.monotonic()
    with PrefetchLoader(lambda p: iter(data[p:]), timed, depth=2) as loader:
        for _ in loader:
            t0 = time.monotonic()
            time.sleep(delay)  # the training step
            steps.append((t0, time.monotonic()))
    elapsed = time.monotonic() - start
    overlapped = sum(1 for (d0, d1) in timed.calls[1:] for (s0, s1) in steps if d0 < s1 and s0 < d1)
    assert len(steps) == len(timed.calls) == 6
    assert overlapped >= 4, (timed.calls, steps)
    assert elapsed < 0.9 * 2 * 6 * delay  # serial decode + step would take 1.2 s
