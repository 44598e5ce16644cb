"""dist_ckpt: the synchronous torch_dist writer round-trips tensors and matches Megatron's format."""

import json

import pytest
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_sail.checkpoint import dcp


@pytest.fixture(scope="module")
def single_rank_group(tmp_path_factory):
    """A one-rank gloo group (dist_checkpointing is collective even on one rank)."""
    created = not dist.is_initialized()
    if created:
        store = tmp_path_factory.mktemp("store") / "rendezvous"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


def _sharded(tensors: dict[str, torch.Tensor]) -> dict:
    """Whole-tensor ShardedTensors under global keys, as a model's sharded_state_dict would give."""
    return {k: ShardedTensor.from_rank_offsets(f"net.{k}", v, replica_id=0) for k, v in tensors.items()}


def test_save_load_roundtrip_bitwise(single_rank_group, tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(6, 4, generator=g),
        "b": torch.randn(4, generator=g).bfloat16(),
        "i": torch.arange(5),
    }
    dcp.save_sharded({"model": _sharded(tensors)}, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "metadata.json").read_text())
    assert meta["sharded_backend"] == "torch_dist"
    target = {k: torch.zeros_like(v) for k, v in tensors.items()}
    loaded = dcp.load_sharded({"model": _sharded(target)}, tmp_path / "ck")
    for k, v in tensors.items():
        assert loaded["model"][k].dtype == v.dtype
        assert torch.equal(loaded["model"][k], v), k


def test_load_reshards_to_a_slice(single_rank_group, tmp_path):
    """A tensor saved whole loads as a shard (what a TP=2 rank asks for) and vice versa."""
    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    dcp.save_sharded({"model": _sharded({"w": full})}, tmp_path / "ck")
    half = ShardedTensor.from_rank_offsets("net.w", torch.zeros(3, 4), (0, 1, 2), replica_id=0)
    # Pretend to be TP rank 1 of 2 along dim 0: global offset 1 of 2 chunks.
    loaded = dist_checkpointing.load(
        {"model": {"w": half}}, str(tmp_path / "ck"), validate_access_integrity=False
    )
    assert torch.equal(loaded["model"]["w"], full[3:])


def test_megatron_default_loader_reads_it_and_strict_load_catches_missing(single_rank_group, tmp_path):
    tensors = {"w": torch.randn(3, 3)}
    dcp.save_sharded({"model": _sharded(tensors)}, tmp_path / "ck")
    plain = dist_checkpointing.load_plain_tensors(str(tmp_path / "ck"))
    assert torch.equal(plain["net.w"], tensors["w"])
    wanted = _sharded({"w": torch.zeros(3, 3), "extra": torch.zeros(2)})
    with pytest.raises(Exception, match="extra"):
        dcp.load_sharded({"model": wanted}, tmp_path / "ck")


def test_load_of_a_folder_that_is_not_a_checkpoint_names_it(single_rank_group, tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        dcp.load_sharded({}, tmp_path)


def test_save_model_is_atomic_and_refuses_to_clobber(single_rank_group, tmp_path):
    model = torch.nn.Linear(3, 2)
    model.sharded_state_dict = lambda: _sharded({k: v.detach() for k, v in model.state_dict().items()})
    out = tmp_path / "model_ck"
    dcp.save_model([model], out)
    assert (out / "metadata.json").is_file()
    assert not any(p.name.startswith(".model_ck.tmp") for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError):
        dcp.save_model([model], out)
    other = torch.nn.Linear(3, 2)
    other.sharded_state_dict = lambda: _sharded({k: v.detach() for k, v in other.state_dict().items()})
    dcp.load_model([other], out)
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)


def test_load_model_reads_weights_of_a_training_checkpoint(single_rank_group, tmp_path):
    """A training checkpoint holds optimizer state next to the weights: load_model (used by
    mcore-to-hf, compare_logits and --init-from) takes the weights and ignores the rest, while a
    full load that does not ask for the extra keys is refused."""
    model = torch.nn.Linear(3, 2)
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    extra = {"exp_avg": ShardedTensor.from_rank_offsets("optimizer.exp_avg", torch.ones(2, 3), replica_id=0)}
    dcp.save_sharded({"model": _sharded(weights), "optimizer": extra}, tmp_path / "ck")
    other = torch.nn.Linear(3, 2)
    other.sharded_state_dict = lambda: _sharded({k: v.detach() for k, v in other.state_dict().items()})
    dcp.load_model([other], tmp_path / "ck")
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)
    with pytest.raises(Exception, match="exp_avg"):
        dcp.load_sharded({"model": _sharded(weights)}, tmp_path / "ck")


def test_load_model_fills_swiglu_halves_in_place(single_rank_group, tmp_path):
    """Megatron's SwiGLU factory saves [gate; up] as two halves of one key; load_model reads them
    straight into the parameter's two views (no concatenated copy) and the parameter holds the
    saved values, next to a plain tensor read the usual way."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    def module(seed):
        g = torch.Generator().manual_seed(seed)
        m = torch.nn.Module()
        m.fc1 = torch.nn.Parameter(torch.randn(8, 3, generator=g))
        m.bias = torch.nn.Parameter(torch.randn(4, generator=g))
        m.sharded_state_dict = lambda: {
            "fc1": apply_swiglu_sharded_factory(
                ShardedTensor.from_rank_offsets("net.fc1", m.fc1.detach(), replica_id=0), ()
            ),
            "bias": ShardedTensor.from_rank_offsets("net.bias", m.bias.detach(), replica_id=0),
        }
        return m

    saved = module(0)
    dcp.save_model([saved], tmp_path / "ck")
    other = module(1)
    storage = other.fc1.untyped_storage().data_ptr()
    dcp.load_model([other], tmp_path / "ck")
    assert torch.equal(other.fc1, saved.fc1) and torch.equal(other.bias, saved.bias)
    assert other.fc1.untyped_storage().data_ptr() == storage
    pieces, filled = dcp._pieces_in_place(other.sharded_state_dict())
    assert set(filled) == {"fc1"} and len(pieces["fc1"]) == 2
