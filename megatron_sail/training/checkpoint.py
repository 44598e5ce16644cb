"""Checkpoints: Megatron-Core distributed checkpoints plus the TrainState stored next to them.

Layout of ``--save DIR``::

    DIR/iter_0000020/      dist checkpoint (model chunks + optimizer, resharding-safe)
    DIR/iter_0000020/train_state.pt   TrainState (rank 0)
    DIR/iter_0000020/manifest.json    size + SHA-256 of every file (training/integrity.py)
    DIR/latest             "20" - written last, by rename, so it never names a partial save
    DIR/.lock              held by the run writing DIR (training/save_dir.py)

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

import os
import pickle
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Optional

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_sail.compat import optimizer as compat_optimizer
from megatron_sail.training import dist_ckpt, integrity
from megatron_sail.training.assets import write_checkpoint_assets
from megatron_sail.models.sail_vl import unwrap

LATEST = "latest"
STATE_FILE = "train_state.pt"
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                  "chained_optim_avoid_prefix": True}
"""Optimizer state layout in every checkpoint: the fully reshardable distributed format, and
one key per parameter even when the optimizer is chained (Megatron-LM's choice for new
checkpoints). An MoE model at EP > 1 gets a ChainedOptimizer (dense params + experts, each over
its own data-parallel group); without ``chained_optim_avoid_prefix`` its keys would carry
``chained_0.`` / ``chained_1.`` and an EP=2 checkpoint would not load at EP=1."""
VERIFIED = dist_ckpt.DistCkptConfig(verify="off")
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


def iter_dir(root: str, iteration: int) -> str:
    """Directory name of one checkpoint."""
    return os.path.join(root, f"iter_{iteration:07d}")


def world_sizes() -> dict:
    """The current parallel layout, to compare with a checkpoint's. The expert-parallel size
    is recorded only when > 1, so that checkpoints written before EP existed still count as the
    same layout (their RNG states are restored) and an EP=2 checkpoint resumed at EP=1 is not."""
    sizes = {"tp": parallel_state.get_tensor_model_parallel_world_size(),
             "pp": parallel_state.get_pipeline_model_parallel_world_size(),
             "dp": parallel_state.get_data_parallel_world_size()}
    ep = parallel_state.get_expert_model_parallel_world_size()
    return dict(sizes, ep=ep) if ep > 1 else sizes


def rng_state() -> dict:
    """This rank's RNG states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(root: str, chunks: list, optimizer, state: TrainState, keep_last: int,
                    config: Optional[dict] = None,
                    pending: Optional[dist_ckpt.ThreadAsyncCallsQueue] = None) -> str:
    """Save model + optimizer + TrainState as iteration ``state.iteration``; returns its dir.

    With ``pending`` the write is scheduled on that queue and the checkpoint is published
    (renamed, `latest`, pruned) only when the queue finalizes it."""
    final = iter_dir(root, state.iteration)
    tmp = final + ".tmp"
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    torch.distributed.barrier()
    sync_params(chunks)
    sd = dist_ckpt.model_sharded_state_dict(chunks)
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd, metadata=OPTIM_METADATA)
    request = dist_ckpt.save_sharded(sd, tmp, async_save=pending is not None)
    _write_train_state(tmp, state, config, optimizer is not None)
    if rank0:
        write_checkpoint_assets(tmp, config)  # tokenizer/ + processor.json: usable as is
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


def _write_train_state(tmp: str, state: TrainState, config: Optional[dict],
                       has_optimizer: bool) -> None:
    """Collective: gather every rank's RNG states; rank 0 writes train_state.pt into tmp."""
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, rng_state())
    if torch.distributed.get_rank() != 0:
        return
    state.rng = dict(enumerate(states))
    state.world = world_sizes()
    payload = {"train_state": asdict(state), "config": config, "has_optimizer": has_optimizer}
    torch.save(payload, os.path.join(tmp, STATE_FILE + ".tmp"))
    os.replace(os.path.join(tmp, STATE_FILE + ".tmp"), os.path.join(tmp, STATE_FILE))


def _publish(root: str, iteration: int, keep_last: int, announce: bool = False) -> None:
    """Collective, once every rank's files are complete: all ranks hash the files into
    ``manifest.json`` (written last), then rank 0 renames iter_N.tmp to iter_N, points `latest`
    at it and prunes; the barrier keeps ranks from racing ahead. ``announce`` prints a line
    (background saves finish at a step the user cannot guess)."""
    final = iter_dir(root, iteration)
    integrity.write_manifest(final + ".tmp", {"iteration": iteration, "saved_at": time.time()})
    if torch.distributed.get_rank() == 0:
        # A checkpoint of the same iteration (a rollback re-saving it) is moved aside rather
        # than deleted first: `latest` may name it, and a crash must not leave it half gone.
        old = final + ".replaced"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(final + ".tmp", final)
        _write_latest(root, iteration)
        shutil.rmtree(old, ignore_errors=True)
        _prune(root, keep_last)
        if announce:
            print(f"[checkpoint] {final} complete (written in the background); latest -> "
                  f"{iteration}", flush=True)
    torch.distributed.barrier()


def _write_latest(root: str, iteration: int) -> None:
    """Point `latest` at a complete checkpoint (write a temporary file, then rename)."""
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
    os.replace(tmp, os.path.join(root, LATEST))


def list_checkpoints(root: str) -> list[int]:
    """Iterations of the complete checkpoints under root, in iteration order."""
    if not os.path.isdir(root):
        return []
    its = [int(m.group(1)) for n in os.listdir(root) if (m := re.fullmatch(r"iter_(\d{7})", n))]
    return sorted(its)


def saved_at(ckpt: str) -> float:
    """When a checkpoint was published: its manifest's save time; for checkpoints without one
    (written before manifests existed), the folder's modification time."""
    try:
        manifest = integrity.read_manifest(ckpt)
    except integrity.CheckpointDamaged:
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
    checkpoints. The checkpoint `latest` names is never deleted."""
    if keep_last <= 0:
        return
    protected = read_latest(root)
    for it in save_order(root)[:-keep_last]:
        if it != protected:
            shutil.rmtree(iter_dir(root, it), ignore_errors=True)


def read_latest(root: str) -> Optional[int]:
    """The iteration `root/latest` names; None without a `latest`. A file that is not a
    decimal iteration number (binary garbage, a partial write) is an error naming it."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(64)
    text = raw.decode("ascii", errors="replace").strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{path}: expected an iteration number (a line like '20'), got "
                         f"{raw[:32]!r}; the file is damaged: point it at one of "
                         f"{[f'iter_{i:07d}' for i in list_checkpoints(root)] or 'no checkpoints'}")
    return int(text)


def resolve_checkpoint(path: str) -> Optional[str]:
    """The checkpoint directory that `path` names: a root with `latest`, or one checkpoint
    (ours or a model-only HF conversion). None when `path` holds no checkpoint yet."""
    latest = os.path.join(path, LATEST)
    iteration = read_latest(path)
    if iteration is not None:
        ckpt = iter_dir(path, iteration)
        if not os.path.isdir(ckpt):
            raise FileNotFoundError(f"{latest} names iteration {iteration} but {ckpt} is missing")
        return ckpt
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    if os.path.isfile(path):
        raise NotADirectoryError(f"{path}: is a file, not a checkpoint folder (expected a "
                                 "--save root with `latest`, or one iter_XXXXXXX folder)")
    return None


@dataclass
class LoadChecks:
    """What is checked before a checkpoint's tensors are read."""

    verify: str = "auto"
    """manifest.json check: auto (hashes when small, else sizes), sizes, or full
    (training/integrity.py)."""
    tokenizer: Optional[dict] = None
    """The current data's tokenizer block; None compares nothing (resume_checks.py)."""
    allow_tokenizer_mismatch: bool = False
    """Load even when the checkpoint was trained on data of another tokenizer or geometry."""


def load_checkpoint(path: str, chunks: list, optimizer=None,
                    checks: Optional[LoadChecks] = None, load_optim: bool = True,
                    load_rng: bool = True) -> Optional[TrainState]:
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
            raise FileNotFoundError(f"--init-from {path}: no checkpoint there (no `latest`, "
                                    "no metadata.json)")
        return None
    check_before_load(ckpt, checks or LoadChecks())
    if optimizer is None or not load_optim or not _has_optimizer(ckpt):
        _load_weights(chunks, ckpt)
        if optimizer is None:
            return None
        optimizer.reload_model_params()  # bf16: refresh the fp32 main weights from the loaded ones
        return _read_train_state(ckpt, load_rng)
    _materialize_optimizer_state(optimizer)
    sd = dist_ckpt.model_sharded_state_dict(chunks)
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=True, metadata=OPTIM_METADATA)
    loaded = dist_ckpt.load_sharded(sd, ckpt, VERIFIED)
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        unwrap(chunk).load_state_dict(loaded[key], strict=True)
    for opt in compat_optimizer.sub_optimizers(optimizer):
        compat_optimizer.keep_torch_adam_step(opt)
    optimizer.load_state_dict(_fit_chained_layout(loaded["optimizer"], optimizer))
    compat_optimizer.unshare_adam_steps(optimizer)
    return _read_train_state(ckpt, load_rng)


def _fit_chained_layout(loaded: dict, optimizer) -> dict:
    """The loaded optimizer state in the layout of this run's optimizer, when the checkpoint
    was saved with another number of chained optimizers (an MoE model at EP > 1 has two:
    dense params and experts; at EP=1 one).

    The tensors (``param_state``) already follow this run's layout: they are read per
    parameter key. Only the small common part (each optimizer's ``param_groups``: LR, betas,
    weight decay, ... keyed by Megatron's group identifiers) keeps the saved layout, so it is
    rebuilt here: each of this run's groups takes the saved group with the same identifiers,
    or, across an EP change, the one that differs only in ``is_expert_parallel``."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys as keys

    subs = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    # The saved layout shows in the common part: one optimizer keeps its param_groups at the
    # top (the distributed one under "optimizer"), a chained one under 0, 1, ... (the tensors
    # sit wherever this run asked for them).
    saved_single = "param_groups" in loaded or "param_groups" in (loaded.get("optimizer") or {})
    chained, saved_chained = len(subs) > 1, not saved_single
    if chained == saved_chained:
        return loaded
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not all(isinstance(sub, DistributedOptimizer) for sub in subs):
        raise ValueError("this checkpoint's optimizer state was saved at another expert-parallel "
                         "layout (EP=1 vs EP>1); changing EP on resume works with the distributed "
                         "optimizer (--use-distributed-optimizer, the default), or resume at the "
                         "saved EP, or load weights only (--finetune / --no-load-optim)")
    saved = [loaded] if not saved_chained else [v for k, v in loaded.items() if isinstance(k, int)]
    groups = [g for part in saved for g in part.get("optimizer", {}).get("param_groups", [])]
    sharding = next((p["param_state_sharding_type"] for p in saved
                     if "param_state_sharding_type" in p), None)

    def ident(group, skip=()):
        return tuple(group.get(k, group.get(f"pre_{k}")) for k in keys if k not in skip)

    def groups_for(sub) -> list:
        out = []
        for mine in sub.optimizer.param_groups:
            match = [g for g in groups if ident(g) == ident(mine)] or \
                [g for g in groups if ident(g, ("is_expert_parallel",)) ==
                 ident(mine, ("is_expert_parallel",))]
            if not match:
                raise ValueError(f"optimizer param group {ident(mine)} (identifiers {keys}) "
                                 "has no counterpart in the checkpoint's optimizer state")
            out.append(dict(match[0], is_expert_parallel=mine.get("is_expert_parallel", False)))
        return out

    def part(tensors: dict, sub) -> dict:
        common = {"optimizer": dict(tensors.get("optimizer", {}), param_groups=groups_for(sub))}
        if sharding is not None:
            common["param_state_sharding_type"] = sharding
        return dict(tensors, **common)

    if chained:
        return {i: part(loaded.get(i, {}), sub) for i, sub in enumerate(subs)}
    return part({k: v for k, v in loaded.items() if not isinstance(k, int)}, subs[0])


def _load_weights(chunks: list, ckpt: str) -> None:
    """Load only the model tensors of a checkpoint (its optimizer state, if any, is ignored;
    a model tensor the checkpoint lacks is an error naming the key)."""
    dist_ckpt.load_model(chunks, ckpt, VERIFIED)


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
        note = {"none": "no manifest.json: files not verified", "sizes": "file sizes verified",
                "full": "file sizes and SHA-256 verified"}[verified]
        print(f"[checkpoint] loading {ckpt} ({note})", flush=True)


def _train_state_globals() -> list:
    """What train_state.pt may hold besides tensors and plain Python values: numpy's RNG state
    array (the numpy generator state in TrainState.rng). Nothing that can run code."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def read_state_file(path: str) -> dict:
    """Read a train_state.pt with ``weights_only=True`` and the allow-list above: a crafted
    pickle that names any other callable is refused before it runs (error names the file)."""
    try:
        with torch.serialization.safe_globals(_train_state_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
        raise integrity.CheckpointDamaged(
            f"{path}: refusing to unpickle it: it holds something a train state never does "
            f"({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise integrity.CheckpointDamaged(f"{path}: unreadable train state ({e})") from None
    if not isinstance(payload, dict) or "train_state" not in payload:
        raise integrity.CheckpointDamaged(f"{path}: not a train state (no 'train_state' entry)")
    return payload


def _has_optimizer(ckpt: str) -> bool:
    """Whether a checkpoint of ours holds optimizer state (not before the first update)."""
    path = os.path.join(ckpt, STATE_FILE)
    if not os.path.isfile(path):
        return False
    return bool(read_state_file(path).get("has_optimizer", True))


def _model_keys(n: int) -> list[str]:
    """Top-level keys of the model chunks in a checkpoint dict (dist_ckpt's convention)."""
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


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

