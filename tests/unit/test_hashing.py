"""The project's digests (megatron_sail/hashing.py) against hashlib over the same bytes."""

import hashlib
import shutil

from megatron_sail.hashing import file_sha256, tree_sha256


def test_file_digest_is_sha256_of_the_bytes_in_any_chunking(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert file_sha256(tmp_path / "f") == file_sha256(str(tmp_path / "f"), chunk=7) == want


def test_tree_digest_follows_names_and_bytes_not_location(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "x.json").write_text("{}")
    (a / "sub" / "y.bin").write_bytes(b"\x00\x01")
    want = hashlib.sha256(b"sub/y.bin\x00\x01x.json{}").hexdigest()  # sorted paths, then bytes
    assert tree_sha256(a) == want
    shutil.copytree(a, tmp_path / "b")
    assert tree_sha256(tmp_path / "b") == want
    (tmp_path / "b" / "x.json").rename(tmp_path / "b" / "z.json")
    assert tree_sha256(tmp_path / "b") != want
