"""Checkpoint hardening on one in-process gloo rank: manifests catch flipped and truncated files
(naming them), pickles from disk cannot run code, pruning follows save order and spares the
checkpoint `latest` names, a damaged `latest` is a clear error, the --save folder is checked
and locked at start, and resume checks (tokenizer, LR schedule, --train-iters) name both values."""

import errno
import json
import os
import pickle
import re
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_sail.checkpoint import integrity, layout
from megatron_sail.training import checkpoint as ckpt
from megatron_sail.training import resume_checks, save_dir


@pytest.fixture(scope="module")
def one_rank():
    """torch.distributed and Megatron's groups on one rank (the checkpoint code is collective)."""
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.platform import distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    with pytest.MonkeyPatch.context() as mp:
        # A lone process (in-process store); nothing is left in the environment for the
        # subprocesses of later tests to inherit.
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(key, raising=False)
        distributed.initialize(ParallelConfig())
        yield
        distributed.shutdown()


class Net(torch.nn.Module):
    """One parameter standing in for a model chunk."""

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((64, 64), value))

    def sharded_state_dict(self):
        return {"w": ShardedTensor.from_rank_offsets("net.w", self.w.data, replica_id=0)}


def _save(root, iteration, value=0.0, keep_last=0, tokenizer=None):
    state = ckpt.TrainState(iteration=iteration, tokenizer=tokenizer or {})
    return ckpt.save_checkpoint(str(root), [Net(value)], None, state, keep_last, config={"a": 1})


def _flip(path, offset=100, count=4096):
    data = bytearray(open(path, "rb").read())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


# ------------------------------------------------------------------ manifest (item 2)
def test_save_writes_a_manifest_that_catches_flips_and_truncation(one_rank, tmp_path):
    d = _save(tmp_path / "ck", 3)
    manifest = json.loads(open(os.path.join(d, integrity.MANIFEST)).read())
    assert set(manifest["files"]) >= {"__0_0.distcp", ".metadata", "metadata.json", "train_state.pt"}
    assert manifest["iteration"] == 3 and manifest["saved_at"] > 0
    assert integrity.verify_checkpoint(d, "auto") == "full"  # small: hashes checked
    shard = os.path.join(d, "__0_0.distcp")
    _flip(shard)
    assert integrity.verify_checkpoint(d, "sizes") == "sizes"  # same size: sizes pass
    with pytest.raises(integrity.CheckpointDamaged, match=r"__0_0\.distcp: contents changed"):
        integrity.verify_checkpoint(d, "auto")
    with pytest.raises(integrity.CheckpointDamaged, match=r"__0_0\.distcp: contents changed"):
        ckpt.load_checkpoint(str(tmp_path / "ck"), [Net()])
    with open(shard, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(
        integrity.CheckpointDamaged, match=r"__0_0\.distcp: truncated: 1000 bytes, the manifest says \d+"
    ):
        integrity.verify_checkpoint(d, "sizes")


def test_truncated_shard_without_manifest_names_the_file(one_rank, tmp_path):
    """Checkpoints from before manifests: DCP's own metadata still tells how long a shard is."""
    d = _save(tmp_path / "ck", 1)
    os.remove(os.path.join(d, integrity.MANIFEST))
    shard = os.path.join(d, "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(integrity.CheckpointDamaged, match=r"__0_0\.distcp: truncated"):
        ckpt.load_checkpoint(str(tmp_path / "ck"), [Net()])


def test_weights_only_checkpoint_loads_after_verification(one_rank, tmp_path):
    _save(tmp_path / "ck", 2, value=7.0)
    target = Net(0.0)
    assert ckpt.load_checkpoint(str(tmp_path / "ck"), [target]) is None
    assert torch.all(target.w == 7.0)


# ------------------------------------------------------------------ unpickling (item 9)
MARKER_ENV = "HARDENING_MARKER"


def _touch_marker(*_args):
    open(os.environ[MARKER_ENV], "w").close()


class Payload:
    """Unpickling this calls os.system-like code: here it creates a marker file."""

    def __reduce__(self):
        return (_touch_marker, ())


def test_crafted_train_state_does_not_run(one_rank, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    d = _save(tmp_path / "ck", 1)
    real = layout.read_state_file(os.path.join(d, layout.STATE_FILE))
    assert isinstance(real["train_state"]["rng"][0]["numpy"][1], np.ndarray)  # allow-listed
    evil = os.path.join(d, "train_state.pt")
    torch.save({"train_state": {"iteration": 1}, "x": Payload()}, evil)
    os.remove(os.path.join(d, integrity.MANIFEST))  # an attacker rewrites the manifest anyway
    with pytest.raises(integrity.CheckpointDamaged, match=r"train_state\.pt: refusing to unpickle"):
        layout.read_state_file(evil)
    with pytest.raises(integrity.CheckpointDamaged, match=r"train_state\.pt: refusing"):
        ckpt.check_before_load(d, ckpt.LoadChecks(tokenizer={"identity": "x"}))
    assert not marker.exists()


def test_crafted_dcp_metadata_does_not_run(one_rank, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    d = _save(tmp_path / "ck", 1)
    integrity.check_dcp_metadata(d)  # the real one passes
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(integrity.CheckpointDamaged, match=r"\.metadata: refusing"):
        integrity.check_dcp_metadata(d)
    assert not marker.exists()


# ------------------------------------------------------------------ pruning (item 1)
def test_prune_by_save_order_keeps_a_rollback_save(one_rank, tmp_path):
    """An old run saved 20 and 30; a new save at 10 (rollback / new run) survives keep_last=1,
    and `latest` names a checkpoint that exists. (Pruning by iteration deleted it at once.)"""
    root = tmp_path / "ck"
    _save(root, 20)
    _save(root, 30)
    _save(root, 10, keep_last=1)
    assert layout.read_latest(str(root)) == 10
    assert layout.list_checkpoints(str(root)) == [10]
    _save(root, 12, keep_last=2)
    assert layout.list_checkpoints(str(root)) == [10, 12]


def test_prune_never_deletes_the_latest_checkpoint(one_rank, tmp_path):
    root = tmp_path / "ck"
    _save(root, 5)
    _save(root, 6)
    ckpt._write_latest(str(root), 5)  # a user pointed `latest` back at 5
    ckpt._prune(str(root), 1)
    assert layout.list_checkpoints(str(root)) == [5, 6]


def test_resaving_an_iteration_replaces_it(one_rank, tmp_path):
    root = tmp_path / "ck"
    _save(root, 4, value=1.0)
    _save(root, 4, value=2.0)
    target = Net()
    ckpt.load_checkpoint(str(root), [target])
    assert torch.all(target.w == 2.0)
    assert sorted(os.listdir(root)) == ["iter_0000004", "latest"]


# ------------------------------------------------------------------ `latest` (item 10)
def test_binary_latest_is_a_clear_error(tmp_path):
    (tmp_path / "iter_0000003").mkdir()
    (tmp_path / "latest").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=r"latest: expected an iteration number.*iter_0000003"):
        layout.resolve_checkpoint(str(tmp_path))
    (tmp_path / "latest").write_text("3\n")
    assert layout.resolve_checkpoint(str(tmp_path)).endswith("iter_0000003")


def test_load_of_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        layout.resolve_checkpoint(str(tmp_path / "f"))


# ------------------------------------------------------------------ --save at start (1, 10)
def test_save_dir_checks(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in save_dir.check_save_dir(str(f), None, False)
    old = tmp_path / "old"
    (old / "iter_0000030").mkdir(parents=True)
    (old / "latest").write_text("30\n")
    problem = save_dir.check_save_dir(str(old), None, False)
    assert "already holds another run's checkpoints (iter_0000030, latest)" in problem
    assert "--overwrite-save" in problem
    assert save_dir.check_save_dir(str(old), str(tmp_path / "elsewhere"), False) is not None
    assert save_dir.check_save_dir(str(old), str(old), False) is None  # resuming it
    assert save_dir.check_save_dir(str(old), str(old / "iter_0000030"), False) is None  # rollback
    assert save_dir.check_save_dir(str(old), None, True) is None  # told to
    assert save_dir.check_save_dir(str(tmp_path / "new"), None, False) is None
    assert (tmp_path / "new").is_dir()


def test_second_run_on_a_save_dir_is_refused(tmp_path):
    first = save_dir.prepare_save_dir(str(tmp_path), None, False)
    with pytest.raises(
        save_dir.SaveDirError,
        match=rf"in use by another run \(host .* pid "
        rf"{os.getpid()}",
    ):
        save_dir.prepare_save_dir(str(tmp_path), None, False)
    first.release()
    save_dir.prepare_save_dir(str(tmp_path), None, False).release()


# ------------------------------------------------------------------ resume checks (3, 10)
BLOCK = {
    "identity": "sha256:aaaa",
    "vocab_size": 300,
    "img_context_id": 7,
    "img_start_id": 5,
    "img_end_id": 6,
    "im_start_id": 1,
    "im_end_id": 2,
    "pad_id": 0,
    "tile_size": 32,
    "tokens_per_tile": 4,
}


def test_tokenizer_mismatch_names_both_values(one_rank, tmp_path):
    other = dict(BLOCK, identity="sha256:bbbb", tile_size=448)
    with pytest.raises(
        resume_checks.ResumeMismatch,
        match=r"identity: 'sha256:aaaa' \(checkpoint\) vs 'sha256:bbbb' \(data\); "
        r"tile_size: 32 \(checkpoint\) vs 448 \(data\)",
    ):
        resume_checks.check_tokenizer(BLOCK, other, "ck", allow=False)
    lines = []
    resume_checks.check_tokenizer(BLOCK, other, "ck", allow=True, log=lines.append)
    assert "WARNING" in lines[0] and "sha256:bbbb" in lines[0]
    # A dataset made before identities existed: the fields it has are compared.
    old = {k: v for k, v in BLOCK.items() if k != "identity"}
    resume_checks.check_tokenizer(BLOCK, old, "ck", allow=False)
    with pytest.raises(resume_checks.ResumeMismatch, match="pad_id: 0"):
        resume_checks.check_tokenizer(BLOCK, dict(old, pad_id=9), "ck", allow=False)
    # Through the checkpoint: the block recorded at save time is compared before loading.
    _save(tmp_path / "ck", 1, tokenizer=BLOCK)
    with pytest.raises(resume_checks.ResumeMismatch, match="sha256:bbbb"):
        ckpt.load_checkpoint(str(tmp_path / "ck"), [Net()], checks=ckpt.LoadChecks(tokenizer=other))
    ckpt.load_checkpoint(str(tmp_path / "ck"), [Net()], checks=ckpt.LoadChecks(tokenizer=BLOCK))


def _scheduler(decay_iters: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    return OptimizerParamScheduler(
        opt,
        init_lr=0.0,
        max_lr=1e-3,
        min_lr=0.0,
        lr_warmup_steps=0,
        lr_decay_steps=decay_iters,
        lr_decay_style="linear",
        start_wd=0.0,
        end_wd=0.0,
        wd_incr_steps=decay_iters,
        wd_incr_style="constant",
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )


def test_schedule_change_on_resume_follows_megatron_semantics():
    saved = _scheduler(20)
    saved.step(10)
    sd = saved.state_dict()
    with pytest.raises(
        resume_checks.ResumeMismatch,
        match=r"lr_decay_steps 20 in the checkpoint, 40 now.*"
        r"--override-opt_param-scheduler",
    ):
        resume_checks.restore_scheduler(_scheduler(40), sd, False, False, "ck")
    lines = []
    over = _scheduler(40)
    resume_checks.restore_scheduler(over, sd, True, False, "ck", log=lines.append)
    assert over.lr_decay_steps == 40 and over.num_steps == 10
    assert "stretches: it now decays over 40 iterations instead of 20" in lines[0]
    assert over.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 30 / 40)
    kept = _scheduler(40)
    resume_checks.restore_scheduler(kept, sd, False, True, "ck", log=lines.append)
    assert kept.lr_decay_steps == 20
    assert kept.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 10 / 20)
    same = _scheduler(20)
    resume_checks.restore_scheduler(same, sd, False, False, "ck")
    assert same.num_steps == 10


def test_train_iters_against_the_loaded_iteration():
    with pytest.raises(resume_checks.ResumeMismatch, match="--train-iters 5 is below .* 10"):
        resume_checks.check_train_iters(10, 5, "ck")
    assert resume_checks.check_train_iters(10, 10, "ck") is True
    assert resume_checks.check_train_iters(10, 20, "ck") is False


def test_missing_checkpoint_is_said_or_refused(tmp_path):
    lines = []
    resume_checks.missing_checkpoint(str(tmp_path), False, None, log=lines.append)
    assert "no checkpoint there" in lines[0] and "randomly initialized" in lines[0]
    with pytest.raises(FileNotFoundError, match="--exit-on-missing-checkpoint"):
        resume_checks.missing_checkpoint(str(tmp_path), True, None)


# ------------------------------------------------------------------ metrics files (1, 10)
def _write_run(run_dir, steps, start, evals=()):
    from megatron_sail.training.metrics import MetricsConfig, MetricsWriter, StepStats

    with MetricsWriter(run_dir, None, 100, 0, MetricsConfig(start_iteration=start)) as w:
        for i in steps:
            w.log_step(
                StepStats(
                    iteration=i,
                    lm_loss=float(i),
                    lr={"lr/default": 1e-4},
                    grad_norm=1.0,
                    step_time_s=1.0,
                    tokens=10,
                    samples=1,
                )
            )
            if i in evals:
                w.log_eval(i, 1.0 / i)


def _iters(path):
    return [json.loads(line)["iteration"] for line in open(path)] if path.exists() else []


def test_resume_keeps_one_record_per_iteration_and_moves_the_rest_aside(tmp_path):
    """A run validated at 4 and 6 crashed after 6 with its checkpoint at 4; the resume repeats
    5-6: valid_metrics.jsonl must not list 6 twice, and the crashed run's records are kept."""
    _write_run(tmp_path, range(1, 7), 0, evals=(4, 6))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 7, "lm_lo')  # a line cut short by the crash
    _write_run(tmp_path, range(5, 9), 4, evals=(6, 8))
    assert _iters(tmp_path / "metrics.jsonl") == list(range(1, 9))
    assert _iters(tmp_path / "valid_metrics.jsonl") == [4, 6, 8]
    assert _iters(tmp_path / "valid_metrics.superseded.jsonl") == [6]
    aside = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in aside[:2]] == [5, 6]
    assert aside[2] == '{"iteration": 7, "lm_lo'


def test_fresh_run_in_an_old_run_dir_keeps_the_old_curve(tmp_path):
    _write_run(tmp_path, range(1, 31), 0)
    _write_run(tmp_path, range(1, 11), 0)
    assert _iters(tmp_path / "metrics.jsonl") == list(range(1, 11))
    assert _iters(tmp_path / "metrics.superseded.jsonl") == list(range(1, 31))


# ------------------------------------------------------------------ tokenizer identity (3)
def test_tokenizer_identity_follows_the_vocabulary_not_the_file_layout(tmp_path):
    from megatron_sail.data.tokenizer import load_tokenizer, tokenizer_identity
    from megatron_sail.demo.generator import train_tokenizer

    path = tmp_path / "tokenizer.json"
    train_tokenizer(["a red circle", "a blue square on the left"] * 4, str(path), vocab_size=280)
    ident = tokenizer_identity(load_tokenizer(str(path)))
    assert ident.startswith("sha256:") and len(ident) == len("sha256:") + 16
    spec = json.loads(path.read_text())
    moved = tmp_path / "copy" / "tokenizer.json"
    moved.parent.mkdir()
    moved.write_text(json.dumps(dict(reversed(list(spec.items()))), indent=4))
    assert tokenizer_identity(load_tokenizer(str(moved))) == ident  # same tokenizer elsewhere
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[3:5]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids swapped
    moved.write_text(json.dumps(spec))
    assert tokenizer_identity(load_tokenizer(str(moved))) != ident


# ------------------------------------------------------------------ flags and conversion (10)
def test_negative_counts_are_clear_errors():
    from megatron_sail.config.run import resolve

    with pytest.raises(ValueError, match=r"--train-iters -5: must be at least 0"):
        resolve(["--recipe", "tiny", "--train-iters", "-5"])
    with pytest.raises(ValueError, match=r"--keep-last -1: must be at least 0"):
        resolve(["--recipe", "tiny", "--keep-last", "-1"])
    with pytest.raises(ValueError, match="exclude each other"):
        resolve(
            ["--recipe", "tiny", "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"]
        )
    assert resolve(["--recipe", "tiny", "--train-iters", "0"]).optim.lr_decay_iters == 1


def test_conversion_refuses_to_write_over_its_source(tmp_path):
    from megatron_sail.convert.checkpoint import ConvertConfig, hf_to_mcore, mcore_to_hf

    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text("{}")
    for out in (src, tmp_path):
        with pytest.raises(ValueError, match="would replace the source checkpoint"):
            hf_to_mcore(src, out, ConvertConfig(overwrite=True))
        with pytest.raises(ValueError, match="would replace the source checkpoint"):
            mcore_to_hf(src, out, ConvertConfig(overwrite=True))
    assert (src / "config.json").read_text() == "{}"


def test_model_only_loads_verify_too(one_rank, tmp_path, monkeypatch):
    """save_model (conversions) writes the manifest; load_model (conversions, inference)
    checks it and DCP's metadata pickle before reading."""
    from megatron_sail.checkpoint import dcp

    out = dcp.save_model([Net(3.0)], tmp_path / "mc")
    target = Net()
    dcp.load_model([target], out)
    assert torch.all(target.w == 3.0)
    _flip(out / "__0_0.distcp")
    with pytest.raises(integrity.CheckpointDamaged, match=r"__0_0\.distcp: contents changed"):
        dcp.load_model([Net()], out)
    marker = tmp_path / "ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    with open(out / ".metadata", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(integrity.CheckpointDamaged, match=r"\.metadata: refusing"):
        dcp.load_model([Net()], out, dcp.DistCkptConfig(verify="off"))
    assert not marker.exists()


def test_model_only_load_of_a_training_checkpoint_ignores_its_optimizer_entries(one_rank, tmp_path):
    """Generate and mcore-to-hf load the weights of training checkpoints, whose common.pt also
    holds the optimizer's non-sharded state: those entries are left unread, not a KeyError."""
    from megatron_sail.checkpoint import dcp

    folder = tmp_path / "train_like"
    dcp.save_sharded(
        {"model": Net(3.0).sharded_state_dict(), "optimizer": {"param_groups": [{"lr": 1.0}]}}, folder
    )
    integrity.write_manifest(str(folder))
    target = Net()
    dcp.load_model([target], folder)
    assert torch.all(target.w == 3.0)


# ------------------------------------------------------------------ issue 20: faults on save and load
def _enospc(path=None):
    """The error a write to a full disk raises (a file name when the failing call knows it)."""
    if path is None:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _asset_config(tmp_path, tokenizer_dir):
    """A run config whose first dataset's meta.json names tiling and a tokenizer folder."""
    prefix = tmp_path / "data" / "train"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "tiling": {"max_tiles": 6, "min_tiles": 1, "thumbnail": True},
        "tokenizer": {"tile_size": 32, "tokens_per_tile": 4, "path": str(tokenizer_dir)},
    }
    (tmp_path / "data" / "train.meta.json").write_text(json.dumps(meta))
    return {"a": 1, "data": {"data_path": [str(prefix)]}}


@pytest.mark.parametrize("fault", ["enospc", "tokenizer_gone", "meta_gone"])
def test_a_save_that_cannot_write_a_part_publishes_nothing(one_rank, tmp_path, monkeypatch, fault):
    """Item 1 (and 7): the tokenizer copy fails (a full disk, the tokenizer or the data's
    meta.json moved) -> the save fails, `latest` stays, no iter dir; a full disk says so once,
    naming the file and the free bytes."""
    from megatron_sail.checkpoint import assets

    root = tmp_path / "ck"
    _save(root, 1)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(assets, "_tokenizer_files", lambda meta, mtime: str(tok))
    if fault == "enospc":

        def full(src, dst, *a, **k):
            raise _enospc(os.path.join(dst, "tokenizer.json"))

        monkeypatch.setattr(assets.shutil, "copytree", full)
        expected = (
            OSError,
            r"^no space left on device while writing \S+iter_0000002\.tmp/tokenizer/"
            r"tokenizer\.json \(\d+ bytes free\)$",
        )
    else:

        def gone(meta, mtime):
            raise FileNotFoundError(f"{meta}: the tokenizer it records ({tok}) is not found")

        monkeypatch.setattr(assets, "_tokenizer_files", gone)
        expected = (FileNotFoundError, "the tokenizer it records")
    config = _asset_config(tmp_path, tok)
    if fault == "meta_gone":  # the data folder moved mid-run: no silent checkpoint without tokenizer/
        os.remove(tmp_path / "data" / "train.meta.json")
        expected = (
            FileNotFoundError,
            r"tokenizer/ not written: the training data's \S+train\.meta\.json is gone",
        )
    state = ckpt.TrainState(iteration=2)
    with pytest.raises(expected[0], match=expected[1]) as e:
        ckpt.save_checkpoint(str(root), [Net(1.0)], None, state, 0, config=config)
    assert str(e.value).count("no space left") == (1 if fault == "enospc" else 0)
    assert layout.read_latest(str(root)) == 1 and layout.list_checkpoints(str(root)) == [1]


def test_a_post_training_save_copies_the_start_tokenizer_or_publishes_nothing(one_rank, tmp_path):
    """Item 1 for dpo/grpo (JSONL data, no meta.json): tokenizer/ and processor.json come from
    the --init-from checkpoint; when it has none any more, the save fails and `latest` stays."""
    init = _save(tmp_path / "init", 1)
    os.makedirs(os.path.join(init, layout.TOKENIZER_DIR))
    with open(os.path.join(init, layout.TOKENIZER_DIR, "tokenizer.json"), "w") as f:
        f.write("{}")
    config = {
        "stage": {"name": "dpo"},
        "data": {"data_path": [str(tmp_path / "pairs.jsonl")]},
        "checkpoint": {"init_from": str(tmp_path / "init")},
    }
    root = tmp_path / "ck"
    ckpt.save_checkpoint(str(root), [Net(1.0)], None, ckpt.TrainState(iteration=1), 0, config)
    assert (root / "iter_0000001" / layout.TOKENIZER_DIR / "tokenizer.json").read_text() == "{}"
    shutil.rmtree(os.path.join(init, layout.TOKENIZER_DIR))
    with pytest.raises(FileNotFoundError, match=r"tokenizer/ not written: neither the --init-from"):
        ckpt.save_checkpoint(str(root), [Net(2.0)], None, ckpt.TrainState(iteration=2), 0, config)
    assert layout.read_latest(str(root)) == 1 and layout.list_checkpoints(str(root)) == [1]


def test_a_full_disk_in_a_shard_or_the_train_state_is_one_clear_error(one_rank, tmp_path, monkeypatch):
    """Item 7: ENOSPC where DCP writes a shard, or where train_state.pt is written: one
    ``no space left on device while writing PATH (N bytes free)``, no chained traceback, and
    nothing published; the CLI prints it as one line."""
    import builtins

    import torch.distributed.checkpoint.filesystem as dcp_fs

    from megatron_sail import cli

    root = tmp_path / "ck"
    _save(root, 1)

    def no_room(*_a, **_k):
        raise _enospc()

    with monkeypatch.context() as m:
        m.setattr(dcp_fs, "_write_item", no_room)
        with pytest.raises(
            OSError,
            match=r"^no space left on device while "
            r"writing \S+iter_0000002\.tmp/__0_0\.distcp \(\d+ bytes free\)$",
        ) as e:
            _save(root, 2)
    assert e.value.__suppress_context__ and e.value.errno == errno.ENOSPC
    real_open = builtins.open

    class FullFile:
        def __init__(self, path):
            self.path = path

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise _enospc(self.path)

    def fake_open(path, mode="r", *a, **k):
        if str(path).endswith("train_state.pt.tmp") and "w" in mode:
            return FullFile(str(path))
        return real_open(path, mode, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", fake_open)
        with pytest.raises(
            OSError,
            match=r"^no space left on device while writing \S+iter_0000003\.tmp/"
            r"train_state\.pt\.tmp \(\d+ bytes free\)",
        ) as e:
            _save(root, 3)
    assert layout.read_latest(str(root)) == 1 and layout.list_checkpoints(str(root)) == [1]
    with pytest.raises(SystemExit) as code:
        cli.run(lambda argv: (_ for _ in ()).throw(e.value), [])
    assert code.value.code == 2


def test_unlisted_files_and_entries_outside_the_checkpoint_are_refused(one_rank, tmp_path, caplog):
    """Item 2: every file a loader reads must be in manifest.json; an entry pointing outside
    the folder is never read; a load without a manifest says 'not verified'."""
    from megatron_sail.checkpoint import dcp

    d = _save(tmp_path / "ck", 1, value=2.0)
    path = os.path.join(d, integrity.MANIFEST)
    manifest = json.loads(open(path).read())
    (tmp_path / "ck" / "iter_0000001" / "extra.bin").write_bytes(b"x")
    with pytest.raises(integrity.CheckpointDamaged, match=r"extra\.bin: not listed in manifest"):
        ckpt.load_checkpoint(str(tmp_path / "ck"), [Net()])
    os.remove(os.path.join(d, "extra.bin"))
    del manifest["files"]["__0_0.distcp"]  # the shard's entry removed, then a weight flipped
    open(path, "w").write(json.dumps(manifest))
    _flip(os.path.join(d, "__0_0.distcp"))
    with pytest.raises(integrity.CheckpointDamaged, match=r"__0_0\.distcp: not listed"):
        dcp.load_model([Net()], d)
    manifest["files"]["../../outside.txt"] = {"size": 4, "sha256": "0" * 64}
    (tmp_path / "outside.txt").write_text("four")
    open(path, "w").write(json.dumps(manifest))
    with pytest.raises(
        integrity.CheckpointDamaged,
        match=r"'\.\./\.\./outside\.txt' points "
        r"outside the checkpoint",
    ):
        integrity.verify_checkpoint(d, "full")
    bare = _save(tmp_path / "bare", 1, value=5.0)
    os.remove(os.path.join(bare, integrity.MANIFEST))  # written before manifests existed
    target = Net()
    with caplog.at_level("WARNING"):
        dcp.load_model([target], bare)  # generate and mcore-to-hf load this way
    assert torch.all(target.w == 5.0)
    assert any("no manifest.json: files not verified" in r.getMessage() for r in caplog.records)


def test_readers_refuse_an_unlisted_file_before_reading_the_model_config(one_rank, tmp_path):
    """Item 2: generate (inspect), the trainer's resolution of --load/--init-from and
    mcore-to-hf read the model config first; an unlisted model_config.yaml planted in a
    checkpoint is refused by name before it is read."""
    from megatron_sail.checkpoint import from_checkpoint
    from megatron_sail.config.train import CheckpointConfig
    from megatron_sail.convert.checkpoint import mcore_to_hf
    from megatron_sail.inference import loading

    root = tmp_path / "ck"
    ckpt.save_checkpoint(str(root), [Net(1.0)], None, ckpt.TrainState(iteration=1), 0, _tiny_run_config())
    (root / "iter_0000001" / layout.MODEL_CONFIG_FILE).write_text("language: {num_layers: 1}\n")
    unlisted = r"model_config\.yaml: not listed in manifest\.json"
    with pytest.raises(integrity.CheckpointDamaged, match=unlisted):
        loading.inspect_checkpoint(root)
    with pytest.raises(integrity.CheckpointDamaged, match=unlisted):
        from_checkpoint.checkpoint_model(CheckpointConfig(load=str(root)))
    with pytest.raises(integrity.CheckpointDamaged, match=unlisted):
        mcore_to_hf(root, tmp_path / "hf")


def test_crafted_common_pt_does_not_run_even_when_torch_is_told_to_unpickle(one_rank, tmp_path, monkeypatch):
    """Item 3: megatron-core reads common.pt with a bare torch.load, which
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns into a full unpickle; it is checked first."""
    from megatron_sail.checkpoint import dcp

    marker = tmp_path / "ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    out = dcp.save_model([Net(3.0)], tmp_path / "mc")
    common = out / layout.COMMON_FILE
    assert common.is_file()
    dcp.load_model([Net()], out)  # the real one passes
    torch.save({"x": Payload()}, common)
    os.remove(out / integrity.MANIFEST)  # an attacker rewrites the manifest anyway
    with pytest.raises(integrity.CheckpointDamaged, match=r"common\.pt: refusing to unpickle"):
        dcp.load_model([Net()], out)
    assert not marker.exists()


def _tiny_run_config():
    from dataclasses import asdict

    from megatron_sail.config.model import tiny

    return {"model": asdict(tiny())}


@pytest.mark.parametrize("named", ["root", "iter_dir"])
def test_a_reader_whose_checkpoint_is_pruned_reads_the_new_latest(
    one_rank, tmp_path, monkeypatch, caplog, named
):
    """Item 4, without a lease (a read-only --save folder): the checkpoint a reader resolved is
    pruned (--keep-last 1) while it reads: with the --save root it reads the new latest and
    says so; with the folder itself the error says it was deleted, not that it is not a
    checkpoint."""
    from megatron_sail.checkpoint import lease
    from megatron_sail.inference import loading

    def read_only(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(lease, "_create", read_only)
    root = tmp_path / "ck"
    config = _tiny_run_config()
    ckpt.save_checkpoint(str(root), [Net(1.0)], None, ckpt.TrainState(iteration=1), 1, config)
    real = loading.read_model_config
    calls = []

    def read_while_pruned(folder):
        if not calls:  # a running trainer publishes iteration 2 and prunes iteration 1
            ckpt.save_checkpoint(str(root), [Net(2.0)], None, ckpt.TrainState(iteration=2), 1, config)
        calls.append(str(folder))
        return real(folder)

    monkeypatch.setattr(loading, "read_model_config", read_while_pruned)
    target = str(root) if named == "root" else layout.iter_dir(str(root), 1)
    if named == "root":
        with caplog.at_level("WARNING"):
            found = loading.inspect_checkpoint(target)
        assert str(found.path) == layout.iter_dir(str(root), 2)
        assert any("was deleted while being read" in r.getMessage() for r in caplog.records)
    else:
        with pytest.raises(FileNotFoundError, match="the checkpoint was deleted while being read"):
            loading.inspect_checkpoint(target)
    assert layout.list_checkpoints(str(root)) == [2]
    gone = r"iter_0000001: no such checkpoint: it was deleted .*`latest` is now iter_0000002"
    with pytest.raises(FileNotFoundError, match=gone):  # named after it was pruned
        loading.inspect_checkpoint(layout.iter_dir(str(root), 1))
    with pytest.raises(FileNotFoundError, match=gone):  # mcore-to-hf and load_generator read so
        layout.read_checkpoint(layout.iter_dir(str(root), 1), lambda ckpt: None)


@pytest.mark.parametrize("named", ["root", "iter_dir"])
def test_a_checkpoint_being_read_is_not_pruned_until_the_reader_is_done(
    one_rank, tmp_path, monkeypatch, named
):
    """Item 4: a reader holds a lease on the checkpoint it reads; a run saving with --keep-last
    1 meanwhile keeps it (the read gets the checkpoint it resolved) and deletes it at its next
    save, once the lease is released."""
    from megatron_sail.checkpoint import lease
    from megatron_sail.inference import loading

    root = tmp_path / "ck"
    config = _tiny_run_config()
    ckpt.save_checkpoint(str(root), [Net(1.0)], None, ckpt.TrainState(iteration=1), 1, config)
    real, during = loading.read_model_config, []

    def read_while_saving(folder):
        if not during:  # a running trainer publishes iteration 2 while iteration 1 is read
            ckpt.save_checkpoint(str(root), [Net(2.0)], None, ckpt.TrainState(iteration=2), 1, config)
            during.append(layout.list_checkpoints(str(root)))
        return real(folder)

    monkeypatch.setattr(loading, "read_model_config", read_while_saving)
    target = str(root) if named == "root" else layout.iter_dir(str(root), 1)
    found = loading.inspect_checkpoint(target)
    assert str(found.path) == layout.iter_dir(str(root), 1) and during == [[1, 2]]
    assert os.listdir(root / lease.LEASE_DIR) == []  # released
    ckpt.save_checkpoint(str(root), [Net(3.0)], None, ckpt.TrainState(iteration=3), 1, config)
    assert layout.list_checkpoints(str(root)) == [3]


def test_generate_holds_its_lease_from_inspection_to_the_end_of_the_load(one_rank, tmp_path, monkeypatch):
    """Item 4: load_generator inspects the checkpoint, builds the model (seconds to minutes),
    then reads the weights; a save with --keep-last 1 during the build does not prune the
    folder it named."""
    from megatron_sail.inference import loading

    root = tmp_path / "ck"
    config = _tiny_run_config()
    ckpt.save_checkpoint(str(root), [Net(1.0)], None, ckpt.TrainState(iteration=1), 1, config)

    def build_while_saving(model_config, parallel, dtype):
        ckpt.save_checkpoint(str(root), [Net(2.0)], None, ckpt.TrainState(iteration=2), 1, config)
        return [Net()]

    monkeypatch.setattr(loading, "_platform", lambda load: None)
    monkeypatch.setattr(loading, "_build", build_while_saving)
    monkeypatch.setattr(loading, "_tokenizer", lambda found, override: "tokenizer")
    monkeypatch.setattr(loading, "Generator", lambda chunks, *rest: chunks)
    [net] = loading.load_generator(layout.iter_dir(str(root), 1))
    assert torch.all(net.w == 1.0) and layout.list_checkpoints(str(root)) == [1, 2]


def test_a_stale_lease_protects_nothing(one_rank, tmp_path):
    """A reader killed with kill -9 leaves its lease; once not refreshed for LEASE_TTL_S it is
    removed and the checkpoint pruned as usual."""
    from megatron_sail.checkpoint import lease

    root = tmp_path / "ck"
    _save(root, 1)
    with lease.reading(layout.iter_dir(str(root), 1)) as held:
        assert held is not None and lease.leased(str(root)) == {"iter_0000001"}
        stale = time.time() - lease.LEASE_TTL_S - 1
        os.utime(held, (stale, stale))
        _save(root, 2, keep_last=1)
        assert layout.list_checkpoints(str(root)) == [2] and not os.path.exists(held)


@pytest.mark.parametrize("me", [0, 1])
def test_a_full_disk_on_another_rank_is_said_once_by_the_rank_that_failed(
    one_rank, tmp_path, monkeypatch, capsys, me
):
    """Item 7 with several ranks: DCP hands every rank the failures of all; rank 1 ran out of
    space. Rank 1 prints the full-disk line at once; rank 0 (no failure of its own) waits the
    grace period, so the job shows the line of the rank that failed, not 'not saved'."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_sail import cli

    shard = str(tmp_path / "iter_0000002.tmp" / "__1_0.distcp")
    failures = {1: (_enospc(shard), None)}
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: me)
    with pytest.raises(OSError) as e:
        with ckpt.disk_full_named(str(tmp_path / "iter_0000002.tmp")):
            raise CheckpointException("save failed", failures)
    slept = []
    # While a rank waits, the launcher's SIGTERM ends it (the trainer's handler only notes it).
    monkeypatch.setattr(cli.time, "sleep", lambda s: slept.append((s, signal.getsignal(signal.SIGTERM))))
    monkeypatch.setenv("RANK", str(me))
    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        with pytest.raises(SystemExit):
            cli.fail(e.value)
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    if me == 1:
        assert slept == [] and re.fullmatch(
            rf"error: no space left on device while writing {re.escape(shard)} \(\d+ bytes free\) \(rank 1\)\n",
            err,
        )
    else:
        assert slept == [(cli.DEFERRED_GRACE_S, signal.SIG_DFL)]
        assert err.startswith(
            f"error: checkpoint {tmp_path}/iter_0000002.tmp not saved: rank(s) [1] could not"
        )


def test_dcp_metadata_naming_files_outside_the_checkpoint_is_refused(one_rank, tmp_path):
    """Item 2: DCP opens the data files `.metadata` names; one naming a path outside the
    checkpoint (the manifest never sees it) is refused before any is opened."""
    import dataclasses

    from megatron_sail.checkpoint import dcp

    d = _save(tmp_path / "ck", 1, value=2.0)
    meta_path = os.path.join(d, layout.DCP_METADATA)
    with open(meta_path, "rb") as f:
        metadata = pickle.load(f)  # our own file, written just above
    outside = tmp_path / "outside.distcp"
    shard = os.path.join(d, "__0_0.distcp")
    outside.write_bytes(open(shard, "rb").read())
    metadata.storage_data = {
        k: dataclasses.replace(v, relative_path="../../outside.distcp")
        for k, v in metadata.storage_data.items()
    }
    with open(meta_path, "wb") as f:
        pickle.dump(metadata, f)
    os.remove(shard)
    os.remove(os.path.join(d, integrity.MANIFEST))  # an attacker rewrites the manifest anyway
    with pytest.raises(
        integrity.CheckpointDamaged, match=r"\.metadata: names data files outside the checkpoint"
    ):
        dcp.load_model([Net()], d, dcp.DistCkptConfig(verify="off"))


class NetWithObject(Net):
    """A chunk whose state also holds a pickled object (Megatron's ShardedObject: DCP stores it
    as a byte item inside the shard file and unpickles it with weights_only=False)."""

    def __init__(self, obj):
        super().__init__()
        self.obj = obj

    def sharded_state_dict(self):
        from megatron.core.dist_checkpointing import ShardedObject

        return dict(
            super().sharded_state_dict(), obj=ShardedObject("net.obj", self.obj, (1,), (0,), replica_id=0)
        )

    def load_state_dict(self, state_dict, strict=True):
        state_dict = dict(state_dict)
        self.obj = state_dict.pop("obj")
        return super().load_state_dict(state_dict, strict)


def test_crafted_pickle_inside_a_shard_does_not_run(one_rank, tmp_path, monkeypatch):
    """Item 3: the pickled items inside shard files go through the allow-list too."""
    from megatron_sail.checkpoint import dcp

    marker = tmp_path / "ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    good = dcp.save_model([NetWithObject({"step": 1})], tmp_path / "good")
    loaded = NetWithObject({})
    dcp.load_model([loaded], good)  # a plain dict passes the allow-list
    assert loaded.obj == {"step": 1}
    evil = dcp.save_model([NetWithObject({"x": Payload()})], tmp_path / "evil")  # manifest matches
    with pytest.raises(
        integrity.CheckpointDamaged, match=r"__0_0\.distcp \(item net\.obj\S*\): refusing to unpickle"
    ):
        dcp.load_model([NetWithObject({})], evil)
    assert not marker.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped where mounting is not allowed): a real full disk,
    with the errors torch's writers really raise on one."""
    import shutil
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("room, part", [(8 << 10, r"__0_0\.distcp"), (40 << 10, r"train_state\.pt\.tmp")])
def test_a_real_full_disk_names_the_file_and_a_save_after_freeing_space_works(
    one_rank, small_disk, room, part
):
    """Item 7 on a real (tmpfs) full disk: the shard (torch's zip writer, whose ENOSPC DCP would
    drop) or train_state.pt cannot be written -> one line naming it, `latest` stays; after
    freeing space the same save succeeds and loads."""
    root = small_disk / "ck"
    _save(root, 1, value=1.0)
    st = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - room))
    with pytest.raises(OSError) as e:
        _save(root, 2, value=2.0)
    assert re.fullmatch(
        rf"no space left on device while writing \S+/iter_0000002\.tmp/{part} \(\d+ bytes free\)",
        str(e.value),
    ), str(e.value)
    assert e.value.__suppress_context__ and e.value.errno == errno.ENOSPC
    assert layout.read_latest(str(root)) == 1 and layout.list_checkpoints(str(root)) == [1]
    os.remove(small_disk / "filler")
    _save(root, 2, value=2.0)
    target = Net()
    ckpt.load_checkpoint(str(root), [target])
    assert layout.read_latest(str(root)) == 2 and torch.all(target.w == 2.0)


def test_a_real_full_disk_during_a_background_save_names_the_shard(one_rank, small_disk, monkeypatch):
    """Item 7 with --async-save: the disk fills up while the background thread writes the shard;
    finalization (as the loop runs it) raises the one line naming the shard; nothing published."""
    import threading

    from megatron_sail.checkpoint import dcp

    root = small_disk / "ck"
    _save(root, 1, value=1.0)
    go, write = threading.Event(), dcp.HostCopyWriter.write
    monkeypatch.setattr(dcp.HostCopyWriter, "write", lambda self: (go.wait(60), write(self)))
    pending = dcp.ThreadAsyncCallsQueue()
    state = ckpt.TrainState(iteration=2)
    ckpt.save_checkpoint(str(root), [Net(2.0)], None, state, 0, config={"a": 1}, pending=pending)
    st = os.statvfs(small_disk)  # the step's synchronous part is done; the shard is not written
    (small_disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - (8 << 10)))
    go.set()
    with pytest.raises(OSError) as e:
        with ckpt.disk_full_named(str(root)):  # loop.finalize_saves
            pending.maybe_finalize_async_calls(blocking=True)
    assert re.fullmatch(
        r"no space left on device while writing \S+/iter_0000002\.tmp/__0_0\.distcp \(\d+ bytes free\)",
        str(e.value),
    ), str(e.value)
    assert layout.read_latest(str(root)) == 1 and layout.list_checkpoints(str(root)) == [1]
