"""Mapped safetensors (convert/mapped_safetensors.py) against safetensors' own reader, and the
lazy HF -> ours mapping the streaming load uses against the eager one."""

from __future__ import annotations

import pytest
import torch

from make_tiny_hf_checkpoint import TinyCheckpointConfig, make_tiny_checkpoint
from megatron_sail.convert import hf_internvl, hf_io
from megatron_sail.convert.checkpoint import checkpoint_model_config, read_hf_checkpoint
from megatron_sail.convert.mapped_safetensors import MappedCheckpoint


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny HF folder split over several shards, bf16 on disk."""
    root = tmp_path_factory.mktemp("mapped") / "hf"
    make_tiny_checkpoint(root, TinyCheckpointConfig(dtype="bfloat16", max_shard_bytes=40_000))
    return root


def test_views_equal_the_copies_and_survive_release(sharded):
    want = hf_io.read_state_dict(sharded)
    mapped = MappedCheckpoint(sharded)
    assert len(hf_io.safetensors_files(sharded)) > 1 and set(mapped.state) == set(want)
    for name, t in mapped.state.items():
        assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name
    mapped.release(mapped.state.values())  # pages leave memory, the data stays readable
    assert all(torch.equal(t, want[n]) for n, t in mapped.state.items())
    mapped.close()


def test_lazy_mapping_equals_hf_to_ours(sharded):
    hf = read_hf_checkpoint(sharded)
    cfg = checkpoint_model_config(hf)
    eager = hf_internvl.hf_to_ours(hf.state, cfg)
    lazy = hf_internvl.LazyOurs(read_hf_checkpoint(sharded, raw=MappedCheckpoint(sharded).state).state, cfg)
    assert set(lazy) == set(eager)
    for key in eager:
        assert torch.equal(lazy[key], eager[key]), key
        assert lazy.sources(key)


def test_bad_files_are_named(tmp_path, sharded):
    one = tmp_path / "one"
    make_tiny_checkpoint(one, TinyCheckpointConfig())
    path = one / hf_io.SAFETENSORS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: the last tensors run past the end
    with pytest.raises(ValueError, match=r"model.safetensors: tensor .* does not match"):
        MappedCheckpoint(one)
    path.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ValueError, match=r"model.safetensors: cannot read safetensors file"):
        MappedCheckpoint(one)
