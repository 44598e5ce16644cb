"""End to end: preprocess -> files -> PackedDataset rows; bad input, atomicity, sharding, tools."""

import filecmp
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import inspect_dataset
import merge_datasets
import preprocess_data
from megatron_sail.config.data import PackingConfig, PreprocessConfig
from megatron_sail.config.images import TilingConfig
from megatron_sail.data import indexed
from megatron_sail.data.loading.dataset import PackedDataset
from megatron_sail.data.preprocess.pipeline import run
from megatron_sail.data.tiling import find_grid, num_tiles
from megatron_sail.demo.generator import DemoConfig, make_demo
from testkit import ROOT

TILING = TilingConfig(tile_size=32, min_tiles=1, max_tiles=4, thumbnail=True, tokens_per_tile=4)
HAND_GRIDS = {(64, 64): (2, 2), (96, 64): (2, 2), (64, 96): (1, 2)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(str(tmp_path_factory.mktemp("demo")), DemoConfig(samples=80, val_samples=5, seed=3))


def config(demo, prefix, inputs=None, **kw):
    packing = kw.pop("packing", PackingConfig(seq_length=256, packing_buffer=30, seed=7))
    return PreprocessConfig(
        inputs=inputs or [demo["train"]],
        output_prefix=str(prefix),
        tokenizer=demo["tokenizer"],
        tiling=kw.pop("tiling", TILING),
        packing=packing,
        **kw,
    )


def files_of(prefix):
    return [p for p in indexed.final_paths(str(prefix))]


@pytest.fixture(scope="module")
def single(demo, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("single") / "train"
    code, summary = run(config(demo, prefix), log=lambda m: None)
    assert code == 0, summary
    return prefix, summary


def test_rows_round_trip_against_the_source(demo, single):
    prefix, summary = single
    ds = PackedDataset(str(prefix))
    tm = ds.tokenizer_meta
    assert (
        len(ds) == summary["rows"] and ds.seq_length == 256 and tm.tokens_per_tile == 4 and tm.tile_size == 32
    )
    with open(demo["train"]) as f:
        source = [json.loads(line) for line in f]
    src_images = {
        open(os.path.join(os.path.dirname(demo["train"]), s["image"]), "rb").read()
        for s in source
        if "image" in s
    }
    n_samples = n_images = 0
    for i in range(len(ds)):
        row = ds[i]
        n = len(row.tokens)
        assert n == 256 and row.labels.shape == row.loss_mask.shape == (256,)
        cu = row.cu_seqlens
        assert cu[0] == 0 and cu[-1] == 256 and np.all(np.diff(cu) > 0)
        real_end = cu[row.num_samples]
        assert np.all(row.tokens[real_end:] == tm.pad_id) and not row.loss_mask[real_end:].any()
        assert len(cu) - 1 in (row.num_samples, row.num_samples + 1)
        for s in range(row.num_samples):
            a, b = cu[s], cu[s + 1]
            assert row.tokens[a] == tm.im_start_id and row.tokens[b - 2] == tm.im_end_id  # whole sample
            assert np.array_equal(row.labels[a : b - 1], row.tokens[a + 1 : b]) and row.labels[b - 1] == 0
            assert row.loss_mask[b - 1] == 0 and row.loss_mask[a:b].sum() > 0
        # the image tokens of each sample match its images' tiles, in order
        for s in range(row.num_samples):
            imgs = [im for im in row.images if im.sample == s]
            a, b = cu[s], cu[s + 1]
            ctx = int((row.tokens[a:b] == tm.img_context_id).sum())
            assert ctx == sum(im.num_tiles * tm.tokens_per_tile for im in imgs)
        for im in row.images:
            assert im.data in src_images
            assert im.grid == find_grid(*im.size, TILING)
            # hand-worked (32 px tiles, max 4): 64x64 ties (1,1) with (2,2) and its area 4096 exceeds
            # half of 2x2's 4096, so (2,2); 96x64 (aspect 1.5) ties (1,1), (2,1), (2,2) at distance 0.5
            # and each tie goes to the larger grid, so (2,2); 64x96 (aspect 0.667) is nearest 1:2 -> (1,2)
            assert (
                im.grid == HAND_GRIDS[im.size]
                and im.num_tiles == HAND_GRIDS[im.size][0] * HAND_GRIDS[im.size][1] + 1
            )
            assert Image.open(io.BytesIO(im.data)).size == im.size
        n_samples += row.num_samples
        n_images += len(row.images)
    assert n_samples == len(source) == summary["samples"]
    assert n_images == sum("image" in s for s in source) == summary["images"]
    used = sum(int(ds.reader.tokens.sequence_lengths.sum()) for _ in [0])
    assert summary["fill_ratio"] == round(used / (256 * len(ds)), 6) > 0.8  # tiny 30-record blocks


def test_same_input_and_seed_give_identical_files_any_worker_count(demo, single, tmp_path):
    code, _ = run(config(demo, tmp_path / "w2", workers=2), log=lambda m: None)
    assert code == 0
    for a, b in zip(files_of(single[0]), files_of(tmp_path / "w2")):
        assert filecmp.cmp(a, b, shallow=False), a
    code, _ = run(config(demo, tmp_path / "s9", packing=PackingConfig(256, 30, seed=9)), log=lambda m: None)
    assert not filecmp.cmp(f"{single[0]}.tokens.bin", f"{tmp_path}/s9.tokens.bin", shallow=False)


def test_shards_merged_equal_a_single_run(demo, single, tmp_path, capsys):
    shards = []
    for i in (1, 0, 2):
        code, _ = run(config(demo, tmp_path / f"part{i}", shard_index=i, num_shards=3), log=lambda m: None)
        assert code == 0
        shards.append(str(tmp_path / f"part{i}"))
    merge = merge_datasets
    assert merge.main(["--inputs", *shards, "--output-prefix", str(tmp_path / "merged")]) == 0
    for a, b in zip(files_of(single[0]), files_of(tmp_path / "merged")):
        assert filecmp.cmp(a, b, shallow=False), a
    capsys.readouterr()
    assert merge.main(["--inputs", *shards[:2], "--output-prefix", str(tmp_path / "partial")]) == 1
    assert "shard index" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "partial.meta.json")


def _img(tmp_path, name, size=(64, 64), fmt="PNG", cut=0):
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format=fmt)
    data = buf.getvalue()
    (tmp_path / name).write_bytes(data[: len(data) - cut])
    return name


def _conv(q="<image>\nWhat?", a="red"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def bad_input(tmp_path):
    good = _img(tmp_path, "good.png")
    lines = [
        {"id": "ok1", "image": good, "conversations": _conv()},
        {"id": "missing", "image": "nope.png", "conversations": _conv()},
        {"id": "trunc", "image": _img(tmp_path, "t.jpg", fmt="JPEG", cut=40), "conversations": _conv()},
        {"id": "garbage", "image": "g.png", "conversations": _conv()},
        "{not json",
        {"id": "role", "image": good, "conversations": [{"from": "robot", "value": "x"}] + _conv()},
        {"id": "noassist", "image": good, "conversations": _conv()[:1]},
        {"id": "mismatch", "image": good, "conversations": _conv(q="<image><image> two?")},
        {"id": "toolong", "conversations": _conv(q="Hi", a="red blue " * 300)},
        {"id": "ok2", "conversations": _conv(q="Hi")},
    ]
    (tmp_path / "g.png").write_bytes(b"\x00garbage bytes")
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


REASONS = {
    "missing_image": 1,
    "truncated_image": 1,
    "undecodable_image": 1,
    "invalid_json": 1,
    "unknown_role": 1,
    "no_assistant_turn": 1,
    "placeholder_mismatch": 1,
    "too_long": 1,
}


def test_every_bad_input_reason_is_counted_and_reported(demo, bad_input, tmp_path):
    prefix = tmp_path / "out"
    code, summary = run(
        config(demo, prefix, inputs=[str(bad_input)], max_reject_rate=1.0), log=lambda m: None
    )
    assert code == 0 and summary["rejects"] == REASONS and summary["samples"] == 2
    lines = [json.loads(x) for x in indexed.read_rejects(str(prefix))]
    assert [(x["key"], x["reason"]) for x in lines] == [
        ("line 2", "missing_image"),
        ("line 3", "truncated_image"),
        ("line 4", "undecodable_image"),
        ("line 5", "invalid_json"),
        ("line 6", "unknown_role"),
        ("line 7", "no_assistant_turn"),
        ("line 8", "placeholder_mismatch"),
        ("line 9", "too_long"),
    ]
    assert all(x["source"] == str(bad_input) for x in lines)
    assert indexed.load_meta(str(prefix))["rejects"] == REASONS


@pytest.mark.parametrize("kw", [{"strict": True}, {"max_reject_rate": 0.5}])
def test_strict_or_high_reject_rate_exits_1_without_a_dataset(demo, bad_input, tmp_path, kw):
    prefix = tmp_path / "out"
    code, summary = run(config(demo, prefix, inputs=[str(bad_input)], **kw), log=lambda m: None)
    assert code == 1 and "error" in summary
    assert os.path.exists(f"{prefix}.rejects.jsonl")
    assert [p for p in os.listdir(tmp_path) if p.startswith("out.")] == ["out.rejects.jsonl"]


def test_too_long_sample_gets_fewer_tiles_first(demo, tmp_path):
    _img(tmp_path, "wide.png", size=(128, 64))  # 2:1 -> (4, 2)? no: max 4 tiles -> (2, 1) + thumbnail
    big = TilingConfig(tile_size=32, min_tiles=1, max_tiles=8, thumbnail=True, tokens_per_tile=16)
    full = num_tiles(find_grid(128, 64, big), True) * 16  # (4, 2) grid + thumbnail = 9 tiles = 144 tokens
    assert find_grid(128, 64, big) == (4, 2)
    (tmp_path / "w.jsonl").write_text(json.dumps({"image": "wide.png", "conversations": _conv()}) + "\n")
    code, _ = run(
        config(
            demo,
            tmp_path / "o",
            inputs=[str(tmp_path / "w.jsonl")],
            tiling=big,
            packing=PackingConfig(seq_length=full, packing_buffer=8),
        ),
        log=lambda m: None,
    )
    assert code == 0
    row = PackedDataset(str(tmp_path / "o"))[0]
    # the text does not fit next to 9 tiles; lowering max tiles 8 -> 7 ... -> 3 gives (2, 1) + thumbnail
    assert row.images[0].grid == (2, 1) and row.images[0].num_tiles == 3


def test_interrupted_run_leaves_no_files(demo, tmp_path, monkeypatch):
    calls = []

    def boom(self, samples, img_context_id):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, samples, img_context_id)

    original = indexed.PackedWriter.add_row
    monkeypatch.setattr(indexed.PackedWriter, "add_row", boom)
    with pytest.raises(KeyboardInterrupt):
        run(config(demo, tmp_path / "x"), log=lambda m: None)
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no complete dataset"):
        PackedDataset(str(tmp_path / "x"))


def test_crash_while_renaming_over_an_old_dataset_leaves_it_incomplete(demo, single, tmp_path, monkeypatch):
    """A rerun into a prefix that holds a complete dataset dies between its renames: the prefix
    must not look complete (an old meta.json over a mix of new and old files)."""
    prefix = tmp_path / "again"
    for src, dst in zip(files_of(single[0]), files_of(prefix)):
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append(dst)
        if len(renames) == 3:
            raise OSError("disk went away")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk went away"):
        run(config(demo, prefix, packing=PackingConfig(256, 30, seed=11)), log=lambda m: None)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not os.path.exists(f"{prefix}.meta.json")
    with pytest.raises(FileNotFoundError, match="no complete dataset"):
        PackedDataset(str(prefix))


def in_flight(message: str) -> tuple[list[int], int, int]:
    """The block ids and the first/last input record a worker-death message names."""
    m = re.search(r"block\(s\) ([\d, ]+) of .*?input records (\d+)\.\.(\d+)", message)
    assert m, message
    return [int(b) for b in m.group(1).split(",")], int(m.group(2)), int(m.group(3))


def test_worker_killed_twice_stops_with_a_clear_error_and_a_rerun_is_identical(demo, single, tmp_path):
    """A pool worker SIGKILLs itself on record 40 (block 1 of 30-record blocks) on every attempt
    (block_pool's SAIL_TEST_KILL_WORKER_AT hook): the run used to wait on that block forever; now
    it retries once, then exits 3 within seconds naming the records in flight, the likely cause
    and how to resume, and publishes nothing. The rerun equals an undisturbed run byte for byte."""
    prefix = str(tmp_path / "k")
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "preprocess_data.py"),
        "--input",
        demo["train"],
        "--tokenizer",
        demo["tokenizer"],
        "--output-prefix",
        prefix,
        "--seq-length",
        "256",
        "--tile-size",
        "32",
        "--tokens-per-tile",
        "4",
        "--max-tiles",
        "4",
        "--packing-buffer",
        "30",
        "--seed",
        "7",
        "--workers",
        "2",
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,  # no hang
        env=dict(os.environ, SAIL_TEST_KILL_WORKER_AT="40", OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 3, out.stderr[-3000:]
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("error: a preprocessing worker process died again after a retry")
    # Which other block was in flight beside block 1 depends on the scheduler: assert only that
    # block 1 (records 30..59) is named and that the range covers it.
    blocks, r0, r1 = in_flight(err)
    assert 1 in blocks and r0 <= 30 and r1 >= 59, err
    assert f"from {demo['train']} line " in err
    assert "out-of-memory" in err and "rerun the same command" in err and "--workers" in err
    assert "running those blocks again in a fresh pool" in out.stderr  # the retry was logged
    assert not any(os.path.exists(p) for p in files_of(prefix)) and os.listdir(tmp_path) == []
    code, _ = run(config(demo, prefix, workers=2), log=lambda m: None)
    assert code == 0
    for a, b in zip(files_of(single[0]), files_of(prefix)):
        assert filecmp.cmp(a, b, shallow=False), a


def test_worker_killed_once_is_retried_and_the_output_is_unchanged(demo, single, tmp_path, monkeypatch):
    flag = tmp_path / "died_once"
    monkeypatch.setenv("SAIL_TEST_KILL_WORKER_AT", f"65:{flag}")  # block 2, first attempt only
    logs = []
    code, summary = run(config(demo, tmp_path / "r", workers=2), log=logs.append)
    assert code == 0 and flag.exists(), summary
    assert sum("worker process died" in m and 2 in in_flight(m)[0] for m in logs) == 1, logs
    for a, b in zip(files_of(single[0]), files_of(tmp_path / "r")):
        assert filecmp.cmp(a, b, shallow=False), a


def test_cli_tools_preprocess_and_inspect(demo, tmp_path, capsys):
    prefix = str(tmp_path / "cli")
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "preprocess_data.py"),
        "--input",
        demo["val"],
        "--tokenizer",
        demo["tokenizer"],
        "--output-prefix",
        prefix,
        "--seq-length",
        "200",
        "--tile-size",
        "32",
        "--tokens-per-tile",
        "4",
        "--max-tiles",
        "2",
        "--no-thumbnail",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    inspect = inspect_dataset
    assert inspect.main([prefix]) == 0
    stats = json.loads(capsys.readouterr().out)
    for key in (
        "samples",
        "rows",
        "images",
        "tiles",
        "text_tokens",
        "image_tokens",
        "loss_tokens",
        "fill_ratio",
        "rejects",
    ):
        assert stats[key] == summary[key], key
    assert stats["samples"] == 5 and stats["image_tokens"] == stats["tiles"] * 4
    assert stats["tiles"] <= 2 * stats["images"]  # --max-tiles 2, no thumbnail
    k = int(indexed.PackedReader(prefix).image_meta[0, 5])  # a sample that holds an image
    assert inspect.main([prefix, "--show", str(k)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sample"] == k and shown["images"]
    assert shown["text"].startswith("<|im_start|>user\n") and shown["trained"].endswith("<|im_end|>")
    runs = [f"<img><IMG_CONTEXT>x{im['grid'][0] * im['grid'][1] * 4}</img>" for im in shown["images"]]
    assert all(r in shown["text"] for r in runs) and "<IMG_CONTEXT><IMG_CONTEXT>" not in shown["text"]
    first_answer = shown["trained"].split("<|im_end|>")[0]  # trained text: each answer + <|im_end|>
    assert first_answer and f"<|im_start|>assistant\n{first_answer}<|im_end|>" in shown["text"]
    with pytest.raises(SystemExit, match="out of range"):
        inspect.main([prefix, "--show", str(stats["samples"])])
    assert inspect.main([prefix, "--show", str(k), "--tokenizer", str(tmp_path / "gone.json")]) == 1
    assert "gone.json" in capsys.readouterr().err


def test_cli_exits_1_after_writing_the_report(demo, bad_input, tmp_path, capsys):
    cli = preprocess_data
    args = [
        "--input",
        str(bad_input),
        "--tokenizer",
        demo["tokenizer"],
        "--seq-length",
        "256",
        "--tile-size",
        "32",
        "--tokens-per-tile",
        "4",
        "--max-tiles",
        "4",
    ]
    assert cli.main(args + ["--output-prefix", str(tmp_path / "a")]) == 1  # 8 of 10 > default 0.05
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["rejects"] == REASONS and summary["reject_rate"] == 0.8 and "--max-reject-rate" in out.err
    assert (
        len(indexed.read_rejects(str(tmp_path / "a"))) == 8 and indexed.load_meta(str(tmp_path / "a")) is None
    )
    assert cli.main(args + ["--output-prefix", str(tmp_path / "b"), "--max-reject-rate", "0.8"]) == 0
    assert indexed.load_meta(str(tmp_path / "b"))["stats"]["samples"] == 2
    capsys.readouterr()
    args[1] = str(tmp_path / "nope.jsonl")
    assert cli.main(args + ["--output-prefix", str(tmp_path / "c")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert inspect_dataset.main([str(tmp_path / "a")]) == 1  # rejects only, no dataset
    assert "no complete dataset" in capsys.readouterr().err


def test_text_only_data_and_an_empty_shard(demo, tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text(json.dumps({"conversations": _conv(q="Hi")}) + "\n")
    cfg = dict(inputs=[str(tmp_path / "t.jsonl")], packing=PackingConfig(seq_length=64, packing_buffer=4))
    assert run(config(demo, tmp_path / "one", **cfg), log=lambda m: None)[0] == 0
    row = PackedDataset(str(tmp_path / "one"))[0]  # an empty image stream still opens
    assert row.images == [] and row.num_samples == 1
    # 1 record = 1 block: shard 1 of 2 is empty, which is fine for a shard (not for a whole run)
    for i in (0, 1):
        assert (
            run(config(demo, tmp_path / f"p{i}", shard_index=i, num_shards=2, **cfg), log=lambda m: None)[0]
            == 0
        )
    assert len(PackedDataset(str(tmp_path / "p1"))) == 0
    assert (
        merge_datasets.main(
            ["--inputs", str(tmp_path / "p0"), str(tmp_path / "p1"), "--output-prefix", str(tmp_path / "m")]
        )
        == 0
    )
    for a, b in zip(files_of(tmp_path / "one"), files_of(tmp_path / "m")):
        assert filecmp.cmp(a, b, shallow=False), a
    (tmp_path / "empty.jsonl").write_text("\n")
    code, summary = run(
        config(demo, tmp_path / "e", inputs=[str(tmp_path / "empty.jsonl")], format="llava"),
        log=lambda m: None,
    )
    assert code == 1 and "no input records" in summary["error"]


def test_webdataset_end_to_end_with_workers(demo, tmp_path):
    import tarfile

    root = os.path.dirname(demo["train"])
    with open(demo["train_captions"]) as f:
        caps = [json.loads(line) for line in f][:12]
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for i, c in enumerate(caps):
            tar.add(os.path.join(root, c["image"]), arcname=f"{i:05d}.png")
            info = tarfile.TarInfo(f"{i:05d}.txt")
            data = c["caption"].encode()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    outs = []
    for w in (1, 2):
        cfg = config(
            demo,
            tmp_path / f"w{w}",
            inputs=[str(tmp_path / "shard.tar")],
            workers=w,
            packing=PackingConfig(seq_length=256, packing_buffer=5),
        )
        code, summary = run(cfg, log=lambda m: None)
        assert code == 0 and summary["samples"] == summary["images"] == len(caps)
        outs.append(tmp_path / f"w{w}")
    for a, b in zip(files_of(outs[0]), files_of(outs[1])):
        assert filecmp.cmp(a, b, shallow=False), a
    ds = PackedDataset(str(outs[1]))
    stored = {im.data for i in range(len(ds)) for im in ds[i].images}
    assert stored == {open(os.path.join(root, c["image"]), "rb").read() for c in caps}


def test_truncated_webdataset_shard_is_a_reported_reject(demo, tmp_path):
    import tarfile

    good = _img(tmp_path, "a.png")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key in ("k0", "k1"):
            tar.add(tmp_path / good, arcname=f"{key}.png")
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"red"))
    data = (tmp_path / "s.tar").read_bytes()
    cut = data.index(b"k1.png") + 512 + 40  # inside k1's image member
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    code, summary = run(
        config(
            demo,
            tmp_path / "o",
            inputs=[str(tmp_path / "cut.tar")],
            max_reject_rate=0.5,
            packing=PackingConfig(seq_length=256, packing_buffer=4),
        ),
        log=lambda m: None,
    )
    assert code == 0 and summary["samples"] == 1 and summary["rejects"] == {"truncated_shard": 1}
    (line,) = [json.loads(x) for x in indexed.read_rejects(str(tmp_path / "o"))]
    assert (line["source"], line["key"], line["reason"]) == (
        str(tmp_path / "cut.tar"),
        "k1",
        "truncated_shard",
    )


def test_multi_image_rows_give_tiles_in_image_token_order(demo, tmp_path):
    """preprocess -> PackedDataset -> collate: the k-th <IMG_CONTEXT> run of a row gets exactly
    the tiles of the k-th stored image (told apart by grey level and run length)."""
    from megatron_sail.config.images import ImageConfig
    from megatron_sail.data.images.pil import PilPipeline
    from megatron_sail.data.loading.collate import collate_rows

    grey = {"a.png": ((64, 64), 30), "b.png": ((64, 96), 120), "c.png": ((32, 32), 220)}
    for name, (size, v) in grey.items():
        Image.new("RGB", size, (v, v, v)).save(tmp_path / name)
    lines = [
        {"image": ["a.png", "b.png"], "conversations": _conv(q="<image> then <image>?")},
        {"image": "c.png", "conversations": _conv()},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, _ = run(
        config(
            demo,
            tmp_path / "m",
            inputs=[str(tmp_path / "m.jsonl")],
            packing=PackingConfig(seq_length=256, packing_buffer=4),
        ),
        log=lambda m: None,
    )
    assert code == 0
    ds = PackedDataset(str(tmp_path / "m"))
    row = ds[0]
    assert len(ds) == 1 and row.num_samples == 2 and len(row.images) == 3
    tm = ds.tokenizer_meta
    mb = collate_rows(
        [row],
        PilPipeline(ImageConfig(backend="pil", tile_size=32, threads=1)),
        image_token_id=tm.img_context_id,
        tokens_per_tile=tm.tokens_per_tile,
    )
    is_ctx = np.concatenate([[0], (row.tokens == tm.img_context_id).astype(np.int8), [0]])
    starts, ends = np.flatnonzero(np.diff(is_ctx) == 1), np.flatnonzero(np.diff(is_ctx) == -1)
    by_size = {size: v for size, v in grey.values()}
    tile = 0
    for (s, e), im in zip(zip(starts, ends), row.images):
        assert e - s == im.num_tiles * tm.tokens_per_tile
        assert row.cu_seqlens[im.sample] <= s < e <= row.cu_seqlens[im.sample + 1]
        want = (by_size[im.size] / 255 - 0.485) / 0.229  # red channel of a grey image
        assert np.allclose(mb.tiles[tile : tile + im.num_tiles, 0].numpy(), want, atol=1e-4)
        tile += im.num_tiles
    assert len(starts) == 3 and tile == mb.num_tiles
    # within the two-image sample, a.png (5 tiles) comes before b.png (3 tiles), as in the text
    two = [im for im in row.images if im.num_tiles > 1]
    assert [im.size for im in two] == [(64, 64), (64, 96)] and two[0].sample == two[1].sample
