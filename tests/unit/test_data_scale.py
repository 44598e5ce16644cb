"""The data path at scale: the trainer's batch indices and tools/bench_data_scale.py's datasets."""

import os

import numpy as np
import pytest

import bench_data_scale
from megatron_sail.bench import data_scale
from megatron_sail.data.loading.dataset import BlendedDataset, PackedDataset
from megatron_sail.training.loop import BatchPlan


def test_one_microbatch_equals_the_full_listing_and_ranks_partition_the_batch():
    for gbs, mbs, dp in ((512, 1, 1), (64, 2, 4), (12, 3, 2)):
        plans = [BatchPlan(gbs, mbs, dp, r) for r in range(dp)]
        for step in (0, 3):
            seen = []
            for p in plans:
                full = p.microbatch_indices(step)
                assert [p.microbatch(step, m) for m in range(p.num_microbatches)] == full
                seen += [i for mb in full for i in mb]
            assert sorted(seen) == list(range(step * gbs, (step + 1) * gbs))


def test_directly_written_text_dataset_reads_back(tmp_path):
    prefix = str(tmp_path / "src")
    data_scale.write_text_dataset(prefix, rows=3000, tokens_per_row=5, seq_length=16, source=2)
    ds = PackedDataset(prefix)
    assert len(ds) == 3000 and ds.seq_length == 16
    for i in (0, 1234, 2999):
        row = ds[i]
        want = 10 + (2 * 131 + i + np.arange(5)) % (data_scale.VOCAB - 10)
        assert np.array_equal(row.tokens[:5], want) and (row.tokens[5:] == 0).all()
        assert row.loss_mask[:5].tolist() == [1, 1, 1, 1, 0] and row.images == []
        assert row.cu_seqlens.tolist() == [0, 5, 16]
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # renamed into place
    blend = BlendedDataset([prefix, prefix], [1.0, 1.0])
    assert blend[7].tokens.shape == (16,)


def test_bench_prints_the_interface_line(tmp_path, capsys):
    assert (
        bench_data_scale.main(
            [
                "--datasets",
                "3",
                "--rows",
                "500",
                "--read",
                "96",
                "--global-batch-size",
                "32",
                "--workdir",
                str(tmp_path),
            ]
        )
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    words = last.split()
    assert [w.split("=")[0] for w in words] == ["rows_per_s", "peak_rss_mb"]
    assert float(words[0].split("=")[1]) > 0 and float(words[1].split("=")[1]) > 10
    assert os.listdir(tmp_path) == []  # datasets removed without --keep


def test_bench_refuses_bad_sizes():
    with pytest.raises(SystemExit):
        bench_data_scale.parse_args(["--datasets", "0", "--rows", "10"])


def test_bench_sail_vl_rows_decode_and_report_cores_per_gpu(tmp_path, capsys):
    """Image rows go through the real writer, reader, collation and the PIL decoder."""
    assert (
        bench_data_scale.main(
            [
                "--datasets",
                "1",
                "--rows",
                "2",
                "--seq-length",
                "4096",
                "--images-per-row",
                "1",
                "--read",
                "2",
                "--global-batch-size",
                "1",
                "--workdir",
                str(tmp_path),
            ]
        )
        == 0
    )
    detail, last = capsys.readouterr().out.strip().splitlines()[-2:]
    fields = dict(w.split("=") for w in detail.split())
    assert float(fields["tiles_per_row"]) == 13.0  # 4x3 grid + thumbnail, decoded
    assert float(fields["gpu_rows_per_s_by_flops"]) < float(fields["gpu_rows_per_s_by_tokens"])
    assert float(fields["loader_cores_per_gpu"]) > 0 and last.startswith("rows_per_s=")


def test_workers_send_small_images_back_and_detach_large_ones(tmp_path):
    """The writer process re-reads only images of at least DETACH_MIN_BYTES, and gets the same
    bytes back; read_regular_file returns exactly the file."""
    import json

    from PIL import Image

    from megatron_sail.config.data import PackingConfig, PreprocessConfig
    from megatron_sail.config.images import TilingConfig
    from megatron_sail.data.preprocess import pipeline as preprocess
    from megatron_sail.data.preprocess.formats import expand_inputs, read_regular_file
    from megatron_sail.demo.generator import DemoConfig, make_demo

    demo = make_demo(str(tmp_path / "demo"), DemoConfig(samples=4, val_samples=2, seed=1))
    big = tmp_path / "big.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(big)  # ~77 KB noise
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(small)
    assert os.path.getsize(big) >= preprocess.DETACH_MIN_BYTES > os.path.getsize(small)
    assert read_regular_file(str(big), 1 << 20) == big.read_bytes()
    src = tmp_path / "caps.jsonl"
    src.write_text("".join(json.dumps({"image": p.name, "caption": "a b"}) + "\n" for p in (big, small)))
    cfg = PreprocessConfig(
        inputs=[str(src)],
        output_prefix=str(tmp_path / "out"),
        tokenizer=demo["tokenizer"],
        tiling=TilingConfig(32, 1, 2, True, 4),
        packing=PackingConfig(1024, 16, 0),
    )
    block, recs = next(preprocess.iter_blocks(cfg, expand_inputs(cfg.inputs), "caption"))
    res = preprocess.SampleBuilder(cfg, "caption").process_block(block, recs, detach=True)
    images = {im.size: im for row in res.rows for s in row for im in s.images}
    assert images[(160, 160)].data is None and images[(32, 32)].data == small.read_bytes()
    preprocess.attach_images(res, recs)
    assert images[(160, 160)].data == big.read_bytes()


def test_locate_only_mode_needs_no_files(capsys):
    assert (
        bench_data_scale.main(
            ["--datasets", "1000", "--rows", "100000000", "--locate-only", "--read", "3000"]
        )
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("rows_per_s=") and " peak_rss_mb=" in last


def test_structure_check_in_chunks_names_the_damaged_entry(tmp_path, monkeypatch):
    """The full index check (``verify="full"``) runs in bounded chunks and still finds damage
    in a late chunk."""
    from megatron_sail.data import integrity

    monkeypatch.setattr(integrity, "STRUCTURE_CHUNK", 256)
    prefix = str(tmp_path / "src")
    data_scale.write_text_dataset(prefix, rows=3000, tokens_per_row=5, seq_length=16, source=0)
    assert len(PackedDataset(prefix, verify="full")) == 3000
    idx = tmp_path / "src.tokens.idx"
    clean = idx.read_bytes()
    damaged = bytearray(clean)
    at = integrity.IDX_HEADER_BYTES + 4 * 3000 + 8 * 1000  # pointer of sequence 1000
    damaged[at : at + 8] = np.int64(7).tobytes()
    idx.write_bytes(bytes(damaged))
    with pytest.raises(integrity.DatasetIntegrityError, match="sequence 1000 starts at byte 7"):
        PackedDataset(prefix, verify="full")
    damaged = bytearray(clean)
    at = integrity.IDX_HEADER_BYTES + 12 * 3000 + 8 * 2500  # document index 2500
    damaged[at : at + 8] = np.int64(3).tobytes()
    idx.write_bytes(bytes(damaged))
    with pytest.raises(integrity.DatasetIntegrityError, match="document indices"):
        PackedDataset(prefix, verify="full")


def _poke(path, at, value, dtype=np.int64):
    """Overwrite one index entry in place."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(np.asarray(value, dtype=dtype).tobytes())


def test_cheap_load_reads_a_bounded_sample_and_still_names_the_damage(tmp_path, monkeypatch):
    """The default load check costs the same at any length: it never runs the per-entry pass,
    yet catches truncation, end offsets, headers and damage at a sampled entry; damage it did
    not sample is found by verify="full" (--data-verify full / inspect_dataset.py --verify)."""
    from megatron_sail.data import indexed, integrity

    n, k = 3000, 256
    monkeypatch.setattr(integrity, "CHEAP_SAMPLE", k)
    prefix = str(tmp_path / "src")
    data_scale.write_text_dataset(prefix, rows=n, tokens_per_row=5, seq_length=16, source=0)
    idx = tmp_path / "src.tokens.idx"
    clean = idx.read_bytes()

    def full_pass(*a):
        raise AssertionError("cheap load ran the O(rows) structure pass")

    real = (integrity.check_stream, integrity.check_rows)
    monkeypatch.setattr(integrity, "check_stream", full_pass)
    monkeypatch.setattr(integrity, "check_rows", full_pass)
    assert len(PackedDataset(prefix)) == n  # sampled checks only
    monkeypatch.setattr(integrity, "check_stream", real[0])
    monkeypatch.setattr(integrity, "check_rows", real[1])
    sampled = set(integrity.sample_indices(n, k).tolist())
    assert (
        len(sampled) <= k + integrity.SAMPLE_RUN
        and {0, n - 1} <= sampled
        and sampled == set(integrity.sample_indices(n, k).tolist())
    )
    hit = sorted(i for i in sampled if 0 < i < n - 1)[len(sampled) // 2]
    miss = next(i for i in range(n // 2, n) if i not in sampled and i - 1 not in sampled)
    pointer = lambda i: integrity.IDX_HEADER_BYTES + 4 * n + 8 * i  # noqa: E731
    cases = [  # (offset, value, dtype, message the cheap load must give)
        (
            pointer(hit),
            7,
            np.int64,
            f"sequence {hit - 1} ends at byte {hit * 20}, but sequence {hit} starts "
            f"at 7|sequence {hit} ends at byte 27, but sequence {hit + 1} starts at {hit * 20 + 20}",
        ),
        (
            pointer(n - 1),
            8,
            np.int64,
            f"sequence {n - 2} ends at byte {(n - 1) * 20}, but sequence {n - 1} starts at 8",
        ),  # the last run is always sampled
        (integrity.IDX_HEADER_BYTES + 4 * (n - 1), 6, np.int32, "covers 60004"),  # last length
        (integrity.IDX_HEADER_BYTES + 12 * n + 8 * n, n - 1, np.int64, "document indices"),
        (integrity.IDX_HEADER_BYTES + 4 * hit, -1, np.int32, f"sequence {hit} has negative length"),
        (17, 1, np.uint8, "dtype code 1"),
    ]
    for at, value, dtype, message in cases:
        idx.write_bytes(clean)
        _poke(idx, at, value, dtype)
        with pytest.raises(integrity.DatasetIntegrityError, match=message) as e:
            PackedDataset(prefix)
        assert "src.tokens" in str(e.value)
    idx.write_bytes(clean)
    _poke(idx, pointer(miss), 7)
    assert len(PackedDataset(prefix)) == n  # not sampled: the cheap load cannot see it
    with pytest.raises(integrity.DatasetIntegrityError, match=f"sequence {miss} starts at byte 7"):
        PackedDataset(prefix, verify="full")
    idx.write_bytes(clean)
    with open(tmp_path / "src.tokens.bin", "r+b") as f:
        f.truncate(n * 20 - 4)
    with pytest.raises(integrity.DatasetIntegrityError, match=r"tokens\.bin: 59996 bytes, its index"):
        indexed.PackedReader(prefix)
