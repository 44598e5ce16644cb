"""Packed datasets verify themselves: checksums written with the files, cheap checks on every load,
``inspect_dataset.py --verify`` for all bytes; each damage is an error naming the file."""

import json
import os
import shutil

import numpy as np
import pytest

import inspect_dataset
from megatron_sail.config.data import PackingConfig, PreprocessConfig
from megatron_sail.config.images import TilingConfig
from megatron_sail.data import indexed, integrity
from megatron_sail.data.integrity import DatasetIntegrityError
from megatron_sail.data.loading.dataset import PackedDataset
from megatron_sail.data.preprocess.pipeline import run
from megatron_sail.demo.generator import DemoConfig, make_demo

TILING = TilingConfig(tile_size=32, min_tiles=1, max_tiles=4, thumbnail=True, tokens_per_tile=4)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(str(tmp_path_factory.mktemp("demo")), DemoConfig(samples=40, val_samples=2, seed=5))


def build(demo, prefix, **kw):
    cfg = PreprocessConfig(
        inputs=[demo["train"]],
        output_prefix=str(prefix),
        tokenizer=demo["tokenizer"],
        tiling=TILING,
        packing=PackingConfig(256, 16, 3),
        **kw,
    )
    code, summary = run(cfg, log=lambda m: None)
    assert code == 0, summary
    return str(prefix)


@pytest.fixture(scope="module")
def clean(demo, tmp_path_factory):
    return build(demo, tmp_path_factory.mktemp("clean") / "d")


@pytest.fixture
def copy(clean, tmp_path):
    """A fresh copy of the clean dataset to damage."""
    for path in indexed.final_paths(clean):
        shutil.copy(path, str(tmp_path / os.path.basename(path)))
    return str(tmp_path / os.path.basename(clean))


def flip(path, offset, n=4):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(n))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def drop_checksums(prefix):
    """Make the copy look like a dataset written before checksums existed."""
    meta = indexed.load_meta(prefix)
    del meta["checksums"]
    with open(f"{prefix}.meta.json", "w") as f:
        json.dump(meta, f)


def test_checksums_match_the_files_and_verify_passes(clean, capsys):
    block = indexed.load_meta(clean)["checksums"]
    names = {os.path.basename(p)[len(os.path.basename(clean)) + 1 :] for p in indexed.final_paths(clean)[:-1]}
    assert block["algorithm"] == "sha256" and set(block["files"]) == names
    for name, rec in block["files"].items():
        path = f"{clean}.{name}"
        assert rec["bytes"] == os.path.getsize(path) and rec["sha256"] == integrity.file_digest(path)
    assert inspect_dataset.main([clean, "--verify"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["damaged"] == [] and len(out["files"]) == 8


def test_flipped_tokens_idx_is_named_at_load_and_by_verify(copy, capsys):
    """Before: inspect reported wrong token counts and training died later with a broadcast error."""
    flip(f"{copy}.tokens.idx", 34 + 8)  # inside the sequence lengths
    with pytest.raises(DatasetIntegrityError, match=r"tokens\.idx: sha256 mismatch"):
        PackedDataset(copy)
    tool = inspect_dataset
    assert tool.main([copy]) == 1
    assert "tokens.idx" in capsys.readouterr().err
    assert tool.main([copy, "--verify"]) == 1
    cap = capsys.readouterr()
    assert (
        json.loads(cap.out)["damaged"] == [f"{copy}.tokens.idx"] and "tokens.idx: sha256 mismatch" in cap.err
    )
    # the structure checks alone (no checksum) name the same file
    with pytest.raises(DatasetIntegrityError, match=r"tokens\.idx: sequence 2 has negative length"):
        indexed.PackedReader(copy, verify="structure")


def test_truncated_idx_is_named_with_or_without_checksums(copy):
    """Before: AttributeError: 'IndexedDataset' object has no attribute 'index'."""
    path = f"{copy}.loss_mask.idx"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 13)
    with pytest.raises(DatasetIntegrityError, match=r"loss_mask\.idx: \d+ bytes, meta.json records"):
        PackedDataset(copy)
    drop_checksums(copy)
    with pytest.raises(DatasetIntegrityError, match=r"loss_mask\.idx: \d+ bytes, but its header counts"):
        PackedDataset(copy)
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(
        DatasetIntegrityError, match=r"loss_mask\.idx: 20 bytes, shorter than an index header"
    ):
        PackedDataset(copy)


def test_bin_damage_is_found_by_verify_or_by_a_cheap_load_of_small_files(copy, monkeypatch, capsys):
    flip(f"{copy}.images.bin", 100)
    with pytest.raises(DatasetIntegrityError, match=r"images\.bin: sha256 mismatch"):
        PackedDataset(copy)  # small files are hashed on every load
    monkeypatch.setattr(integrity, "CHEAP_HASH_BYTES", 0)
    assert len(PackedDataset(copy)) > 0  # large files: sizes and structure only on load
    assert inspect_dataset.main([copy, "--verify"]) == 1
    assert json.loads(capsys.readouterr().out)["damaged"] == [f"{copy}.images.bin"]


def test_structure_checks_name_the_file_for_a_dataset_without_checksums(copy, capsys):
    drop_checksums(copy)
    assert len(PackedDataset(copy)) > 0  # an older dataset still loads
    tool = inspect_dataset
    assert tool.main([copy, "--verify"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["files"] == [] and "no checksums recorded" in out["note"]
    # sequence pointer damaged
    flip(f"{copy}.tokens.idx", 34 + 4 * len(PackedDataset(copy).reader.tokens) + 8 * 3)
    with pytest.raises(DatasetIntegrityError, match=r"tokens\.idx: sequence 3 starts at byte"):
        PackedDataset(copy)
    assert tool.main([copy, "--verify"]) == 1
    assert "tokens.idx" in capsys.readouterr().err


def test_image_table_and_meta_json_damage_are_named(copy):
    meta = np.load(f"{copy}.images_meta.npy")
    meta[0, 5] = 10**6  # an image pointing at a sample outside its row
    np.save(f"{copy}.images_meta.npy", meta)
    drop_checksums(copy)
    with pytest.raises(DatasetIntegrityError, match=r"images_meta\.npy: image 0 belongs to sample 1000000"):
        PackedDataset(copy)
    with open(f"{copy}.images_meta.npy", "wb") as f:
        f.write(b"\x93NUMPY garbage")
    with pytest.raises(DatasetIntegrityError, match=r"images_meta\.npy: not a readable"):
        PackedDataset(copy)
    with open(f"{copy}.meta.json", "w") as f:
        f.write('{"format": ')
    with pytest.raises(DatasetIntegrityError, match=r"meta\.json: not valid JSON"):
        PackedDataset(copy)


def test_merged_shards_carry_valid_checksums(demo, clean, tmp_path, capsys):
    from megatron_sail.data.preprocess.merge import merge_shards

    parts = [build(demo, tmp_path / f"p{i}", shard_index=i, num_shards=2) for i in (0, 1)]
    assert indexed.load_meta(parts[0])["checksums"] != indexed.load_meta(parts[1])["checksums"]
    merge_shards(parts, str(tmp_path / "m"))
    assert indexed.load_meta(str(tmp_path / "m"))["checksums"] == indexed.load_meta(clean)["checksums"]
    assert inspect_dataset.main([str(tmp_path / "m"), "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]


def test_verify_level_is_checked():
    with pytest.raises(ValueError, match="verify must be one of"):
        indexed.PackedReader("/nonexistent", verify="sometimes")


def test_idx_above_the_cheap_hash_cap_is_checked_by_structure_then_digest_at_full(copy):
    """An index too large to hash on every load (cap patched to 0) is still checked: a small
    dataset gets the whole structure check at cheap, and full adds every digest."""
    flip(f"{copy}.tokens.idx", 34 + 8)
    import unittest.mock as mock

    with mock.patch.object(integrity, "CHEAP_HASH_BYTES", 0):
        with pytest.raises(DatasetIntegrityError, match=r"tokens\.idx: sequence 2 has negative length"):
            PackedDataset(copy)
        with pytest.raises(DatasetIntegrityError, match=r"tokens\.idx: sha256 mismatch"):
            PackedDataset(copy, verify="full")


def test_data_verify_flag_selects_the_load_check_level():
    from megatron_sail.config.run import resolve

    assert resolve(["--recipe", "tiny"]).data.data_verify == "cheap"
    assert resolve(["--recipe", "tiny", "--data-verify", "full"]).data.data_verify == "full"
    with pytest.raises(ValueError, match="--data-verify 'sometimes': expected cheap or full"):
        resolve(["--recipe", "tiny", "--data-verify", "sometimes"])
