"""Checkpoints: Megatron-Core distributed checkpoints plus the TrainState stored next to them.

The layout of ``--save DIR`` (iter_XXXXXXX folders, train_state.pt, manifest.json, `latest`)
is checkpoint/layout.py's; this module saves and loads training runs in it.

A save goes to ``iter_XXXXXXX.tmp`` first; when every rank is done the manifest is written
into it, it is renamed, ``latest`` is replaced, and all but the ``keep_last`` most recently
saved checkpoints are deleted (save order, never the one ``latest`` names). Loads check the
manifest, DCP's metadata pickle and the recorded tokenizer before reading a tensor. Sharded
tensors carry global keys and the distributed optimizer uses the fully reshardable format, so a
checkpoint saved at one TP/PP/DP loads at another.

With a ``ThreadAsyncCallsQueue`` (``--async-save``) the save returns after planning and the host
copy (train_state.pt is written then too); the files are written in the background and the
rename, ``latest`` and pruning become finalize functions that run, in that order, when the loop
calls ``maybe_finalize_async_calls``. Until then only ``iter_XXXXXXX.tmp`` exists.
"""

from __future__ import annotations

import errno
import io
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Optional

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_sail.checkpoint import dcp, disk_full, integrity, lease
from megatron_sail.checkpoint.assets import write_checkpoint_assets
from megatron_sail.checkpoint.layout import (
    LATEST,
    STATE_FILE,
    CheckpointDamaged,
    iter_dir,
    list_checkpoints,
    read_latest,
    read_state_file,
    resolve_checkpoint,
)
from megatron_sail.checkpoint.optimizer_state import OPTIM_METADATA, fit_chained_layout
from megatron_sail.compat import optimizer as compat_optimizer
from megatron_sail.models.sail_vl import unwrap

VERIFIED = dcp.DistCkptConfig(verify="off")
"""Loads after check_before_load: the manifest was checked there, with --ckpt-verify."""


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that a resumed run needs."""

    iteration: int = 0
    """Optimizer steps completed."""
    consumed_samples: int = 0
    """Rows consumed by training so far (all DP ranks)."""
    consumed_tokens: int = 0
    """Real tokens consumed by training so far."""
    skipped_steps: int = 0
    """NaN/Inf steps skipped so far."""
    data: dict = field(default_factory=dict)
    """Loader position at save time, for inspection only: a resume derives the position from
    consumed_samples (training/loop.py)."""
    scheduler: dict = field(default_factory=dict)
    """OptimizerParamScheduler.state_dict()."""
    rng: dict = field(default_factory=dict)
    """Per global rank RNG states (python, numpy, torch, Megatron tracker)."""
    world: dict = field(default_factory=dict)
    """tp / pp / dp (and ep when > 1) sizes at save time: RNG states are restored only when
    they match."""
    tokenizer: dict = field(default_factory=dict)
    """The training data's tokenizer block (identity, special ids, tile size, tokens per tile;
    training/resume_checks.py): a resume or --init-from onto other data is refused."""


def world_sizes() -> dict:
    """The current parallel layout, to compare with a checkpoint's. The expert-parallel size
    is recorded only when > 1, so that checkpoints written before EP existed still count as the
    same layout (their RNG states are restored) and an EP=2 checkpoint resumed at EP=1 is not."""
    sizes = {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }
    ep = parallel_state.get_expert_model_parallel_world_size()
    return dict(sizes, ep=ep) if ep > 1 else sizes


def rng_state() -> dict:
    """This rank's RNG states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    root: str,
    chunks: list,
    optimizer,
    state: TrainState,
    keep_last: int,
    config: Optional[dict] = None,
    pending: Optional[dcp.ThreadAsyncCallsQueue] = None,
) -> str:
    """Save model + optimizer + TrainState as iteration ``state.iteration``; returns its dir.

    With ``pending`` the write is scheduled on that queue and the checkpoint is published
    (renamed, `latest`, pruned) only when the queue finalizes it."""
    final = iter_dir(root, state.iteration)
    tmp = final + ".tmp"
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.makedirs(tmp)
        except OSError as e:  # a full disk can refuse even the folder: the same one line
            raise (disk_full.explain(e, tmp) or e) from None
    torch.distributed.barrier()
    sync_params(chunks)
    sd = dcp.model_sharded_state_dict(chunks)
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd, metadata=OPTIM_METADATA)
    with disk_full_named(tmp):
        request = dcp.save_sharded(sd, tmp, async_save=pending is not None)
    payload = _train_state_payload(state, config, optimizer is not None)
    error = None
    if rank0:  # every part or nothing: a checkpoint without its tokenizer is not published
        try:
            write_bytes(os.path.join(tmp, STATE_FILE), payload)
            write_checkpoint_assets(tmp, config)  # tokenizer/ + processor.json: usable as is
        except Exception as e:  # noqa: BLE001 - agreed on by every rank below, then raised
            error = disk_full.explain(e, tmp) or e
    _agree(error, tmp)
    if pending is None:
        _publish(root, state.iteration, keep_last)
    else:
        # Bound now: the loop moves state.iteration on before this runs.
        request.add_finalize_fn(partial(_publish, root, state.iteration, keep_last, True))
        pending.schedule_async_request(request)
    return final


def sync_params(chunks: list) -> None:
    """Collective: finish the distributed optimizer's param all-gather now. With overlapped
    param gather (GPUs) the update reaches the other DP ranks' copies only in the next forward's
    pre-hooks, so right after a step each replica is current only for its own shard; a save
    then would mix this step's shards with the previous step's."""
    for chunk in chunks:
        ddp = getattr(chunk, "ddp_config", None)
        if ddp is not None and ddp.use_distributed_optimizer and ddp.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def _train_state_payload(state: TrainState, config: Optional[dict], has_optimizer: bool) -> Optional[bytes]:
    """Collective: gather every rank's RNG states; rank 0 gets train_state.pt's bytes (torch.save
    into memory: written by ``write_bytes``, a full disk is an OSError naming the file instead of
    torch's zip writer's 'unexpected pos'), the other ranks None."""
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, rng_state())
    if torch.distributed.get_rank() != 0:
        return None
    state.rng = dict(enumerate(states))
    state.world = world_sizes()
    buffer = io.BytesIO()
    torch.save({"train_state": asdict(state), "config": config, "has_optimizer": has_optimizer}, buffer)
    return buffer.getvalue()


def write_bytes(path: str, data: bytes) -> None:
    """Write a file under a temporary name, then rename it: a reader never sees half of it."""
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(data)
    except OSError as e:  # a file object's write error does not name the file
        raise disk_full.write_error(path + ".tmp", e) from None
    os.replace(path + ".tmp", path)


@contextmanager
def disk_full_named(path: str):
    """A collective write step of a save (every rank raises together when one fails): a full
    disk becomes one "no space left on device while writing PATH (N bytes free)" line naming the file on the rank that hit it, and
    ``CheckpointNotSaved`` on the others, instead of DCP's per-rank chained tracebacks."""
    try:
        yield
    except (disk_full.OutputWriteError, disk_full.CheckpointNotSaved):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        explained = None if isinstance(e, (KeyboardInterrupt, SystemExit)) else disk_full.explain(e, path)
        if explained is None:
            raise
        failures = getattr(e, "failures", None) or {}
        rank = torch.distributed.get_rank()
        if failures and rank not in failures:
            raise disk_full.CheckpointNotSaved(
                errno.ENOSPC,
                f"checkpoint {path} not saved: rank(s) {sorted(failures)} could "
                "not write their files (full disk)",
            ) from None
        raise disk_full.reported_by(explained, sorted(failures) or [rank], rank) from None


def _agree(error: Optional[BaseException], path: str) -> None:
    """Collective: when a rank failed a step only it runs (rank 0's train_state.pt and assets),
    it raises its error and every other rank ``CheckpointNotSaved``; nothing is published."""
    failed = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(
        failed, None if error is None else getattr(error, "errno", None) or errno.EIO
    )
    ranks = [r for r, code in enumerate(failed) if code is not None]
    if error is not None:
        raise disk_full.reported_by(error, ranks, torch.distributed.get_rank())
    if ranks:
        raise disk_full.CheckpointNotSaved(
            failed[ranks[0]], f"checkpoint {path} not saved: rank(s) {ranks} could not write their part"
        )


def _publish(root: str, iteration: int, keep_last: int, announce: bool = False) -> None:
    """Collective, once every rank's files are complete: all ranks hash the files into
    ``manifest.json`` (written last), then rank 0 renames iter_N.tmp to iter_N, points `latest`
    at it and prunes; the barrier keeps ranks from racing ahead. ``announce`` prints a line
    (background saves finish at a step the user cannot guess)."""
    final = iter_dir(root, iteration)
    error = None
    try:  # collective; rank 0 writes the file after the ranks' hashes are gathered
        integrity.write_manifest(final + ".tmp", {"iteration": iteration, "saved_at": time.time()})
        if torch.distributed.get_rank() == 0:
            _rename_into_place(root, iteration)
    except Exception as e:  # noqa: BLE001 - agreed on by every rank below, then raised
        error = disk_full.explain(e, final + ".tmp") or e
    _agree(error, final)
    if torch.distributed.get_rank() == 0:
        _prune(root, keep_last)
        if announce:
            print(
                f"[checkpoint] {final} complete (written in the background); latest -> {iteration}",
                flush=True,
            )
        else:
            print(f"saved checkpoint iter_{iteration} -> {final}", flush=True)
    torch.distributed.barrier()


def _rename_into_place(root: str, iteration: int) -> None:
    """Rank 0: iter_N.tmp becomes iter_N, then `latest` names it. A checkpoint of the same
    iteration (a rollback re-saving it) is moved aside rather than deleted first: `latest` may
    name it, and a crash must not leave it half gone."""
    final = iter_dir(root, iteration)
    old = final + ".replaced"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(final + ".tmp", final)
    _write_latest(root, iteration)
    shutil.rmtree(old, ignore_errors=True)


def _write_latest(root: str, iteration: int) -> None:
    """Point `latest` at a complete checkpoint (write a temporary file, then rename)."""
    write_bytes(os.path.join(root, LATEST), f"{iteration}\n".encode())


def saved_at(ckpt: str) -> float:
    """When a checkpoint was published: its manifest's save time; for checkpoints without one
    (written before manifests existed), the folder's modification time."""
    try:
        manifest = integrity.read_manifest(ckpt)
    except CheckpointDamaged:
        manifest = None
    if manifest and isinstance(manifest.get("saved_at"), (int, float)):
        return float(manifest["saved_at"])
    return os.path.getmtime(ckpt)


def save_order(root: str) -> list[int]:
    """Iterations of the complete checkpoints under root, oldest save first (ties: iteration)."""
    return sorted(list_checkpoints(root), key=lambda it: (saved_at(iter_dir(root, it)), it))


def _prune(root: str, keep_last: int) -> None:
    """Delete all but the keep_last most recently SAVED checkpoints (0 keeps everything).

    Save order, not iteration order: a run that saves below an existing iteration (a rollback
    with --load .../iter_25, or --overwrite-save into an old run's folder) keeps its own new
    checkpoints. The checkpoint `latest` names is never deleted, nor one a reader (generate,
    mcore-to-hf) holds a lease on (checkpoint/lease.py): that one goes at a later save."""
    if keep_last <= 0:
        return
    protected = read_latest(root)
    held = lease.leased(root)
    for it in save_order(root)[:-keep_last]:
        if it == protected:
            continue
        if os.path.basename(iter_dir(root, it)) in held:  # a later save deletes it
            print(f"[checkpoint] {iter_dir(root, it)} kept for now: a reader holds it", flush=True)
            continue
        shutil.rmtree(iter_dir(root, it), ignore_errors=True)


@dataclass
class LoadChecks:
    """What is checked before a checkpoint's tensors are read."""

    verify: str = "auto"
    """manifest.json check: auto (hashes when small, else sizes), sizes, or full
    (checkpoint/integrity.py)."""
    tokenizer: Optional[dict] = None
    """The current data's tokenizer block; None compares nothing (resume_checks.py)."""
    allow_tokenizer_mismatch: bool = False
    """Load even when the checkpoint was trained on data of another tokenizer or geometry."""


def load_checkpoint(
    path: str,
    chunks: list,
    optimizer=None,
    checks: Optional[LoadChecks] = None,
    load_optim: bool = True,
    load_rng: bool = True,
) -> Optional[TrainState]:
    """Load weights (and optimizer + TrainState when ``optimizer`` is given) from ``path``.

    With ``optimizer=None`` this is ``--init-from``: weights only, step counters start at 0.
    Returns the TrainState (None for weights-only or a missing checkpoint). Before any tensor
    is read the files are checked against the manifest, DCP's metadata pickle against its
    allow-list, and the recorded tokenizer against ``checks.tokenizer``. ``load_optim=False``
    (--no-load-optim) leaves the optimizer as built; ``load_rng=False`` (--no-load-rng) keeps
    this process's seeded RNG."""
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        if optimizer is None:
            raise FileNotFoundError(
                f"--init-from {path}: no checkpoint there (no `latest`, no metadata.json)"
            )
        return None
    check_before_load(ckpt, checks or LoadChecks())
    if optimizer is None or not load_optim or not _has_optimizer(ckpt):
        _load_weights(chunks, ckpt)
        if optimizer is None:
            return None
        optimizer.reload_model_params()  # bf16: refresh the fp32 main weights from the loaded ones
        return _read_train_state(ckpt, load_rng)
    _materialize_optimizer_state(optimizer)
    sd = dcp.model_sharded_state_dict(chunks)
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=True, metadata=OPTIM_METADATA)
    loaded = dcp.load_sharded(sd, ckpt, VERIFIED)
    for key, chunk in zip(dcp.model_keys(len(chunks)), chunks):
        unwrap(chunk).load_state_dict(loaded[key], strict=True)
    for opt in compat_optimizer.sub_optimizers(optimizer):
        compat_optimizer.keep_torch_adam_step(opt)
    optimizer.load_state_dict(fit_chained_layout(loaded["optimizer"], optimizer))
    compat_optimizer.unshare_adam_steps(optimizer)
    return _read_train_state(ckpt, load_rng)


def _load_weights(chunks: list, ckpt: str) -> None:
    """Load only the model tensors of a checkpoint (its optimizer state, if any, is ignored;
    a model tensor the checkpoint lacks is an error naming the key)."""
    dcp.load_model(chunks, ckpt, VERIFIED)


def _materialize_optimizer_state(optimizer) -> None:
    """Create Adam's state tensors before loading into them: a fresh optimizer has none, and
    Megatron's distributed optimizer cannot describe (or receive) state it does not hold.
    One zero-gradient step at lr 0 and weight decay 0 creates them without moving weights."""
    for opt in compat_optimizer.sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None or len(inner.state) > 0 or not compat_optimizer.can_init_dummy_states(opt):
            continue
        saved = [(g["lr"], g["weight_decay"]) for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        compat_optimizer.init_dummy_states(opt)
        for g, (lr, wd) in zip(inner.param_groups, saved):
            g["lr"], g["weight_decay"] = lr, wd


def check_before_load(ckpt: str, checks: LoadChecks) -> None:
    """Collective: manifest, DCP metadata and tokenizer checks of one checkpoint folder; each
    failure raises on every rank with the file (or both tokenizer values) named."""
    from megatron_sail.training.resume_checks import check_tokenizer

    verified = integrity.verify_checkpoint(ckpt, checks.verify)
    integrity.check_dcp_metadata(ckpt)
    if checks.tokenizer is not None and os.path.isfile(os.path.join(ckpt, STATE_FILE)):
        saved = read_state_file(os.path.join(ckpt, STATE_FILE))["train_state"].get("tokenizer")
        check_tokenizer(saved or {}, checks.tokenizer, ckpt, checks.allow_tokenizer_mismatch)
    if torch.distributed.get_rank() == 0:
        print(f"[checkpoint] loading {ckpt} ({integrity.VERIFIED_NOTE[verified]})", flush=True)


def _has_optimizer(ckpt: str) -> bool:
    """Whether a checkpoint of ours holds optimizer state (not before the first update)."""
    path = os.path.join(ckpt, STATE_FILE)
    if not os.path.isfile(path):
        return False
    return bool(read_state_file(path).get("has_optimizer", True))


def _read_train_state(ckpt: str, load_rng: bool = True) -> TrainState:
    """Read train_state.pt and restore this rank's RNG when the layout is unchanged (and
    ``load_rng``)."""
    path = os.path.join(ckpt, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing: {ckpt} holds weights only; use --init-from")
    payload = read_state_file(path)
    state = TrainState(**payload["train_state"])
    if load_rng and state.world == world_sizes():
        set_rng_state(state.rng[torch.distributed.get_rank()])
    return state
