"""Checkpoint integrity: a per-file manifest written at save time and checked at load time.

``manifest.json`` lists every file of a checkpoint folder with its size and SHA-256. It is
written last, into the temporary folder, after every rank's files (and train_state.pt) are
complete and before the folder is renamed, so a published checkpoint always has one; by the
synchronous save and, for ``--async-save``, by the finalization that publishes the save.
Hashing is spread over the ranks (file i goes to rank i mod world size) and costs one read of
the checkpoint (measured in docs/performance.md, "Checkpoint integrity").

At load, sizes are always compared (a stat per file: catches truncated and missing files);
full hashes are compared for ``verify="full"`` and, with ``"auto"``, when the checkpoint holds
at most ``AUTO_FULL_BYTES`` per rank. A damaged file is an error naming the file and what is
wrong. Checkpoints without a manifest (older ones, other tools) load with a note.

DCP's ``.metadata`` is a plain pickle that torch.distributed.checkpoint reads with
``pickle.load``; ``check_dcp_metadata`` unpickles it first with an allow-list of the classes DCP
writes, so a crafted file is refused before DCP touches it.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import os
import pickle
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sail.checkpoint.layout import (
    COMMON_FILE,
    DCP_METADATA,
    MANIFEST,
    CheckpointDamaged,
    allowed_globals,
)
from megatron_sail.hashing import file_sha256

MANIFEST_VERSION = 1
AUTO_FULL_BYTES = 1 << 30
"""``verify="auto"`` hashes every file when the checkpoint holds at most this much per rank."""
VERIFY_MODES = ("auto", "sizes", "full")


def list_files(folder: str) -> list[str]:
    """Relative paths of the regular files under ``folder`` (sorted; the manifest excluded)."""
    out = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), folder)
            if rel != MANIFEST and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed (tools and unit tests)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj):
    """Rank 0's object on every rank."""
    rank, world = _world()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list:
    """Every rank's object, in rank order, on every rank."""
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def write_manifest(folder: str, extra: Optional[dict] = None) -> Optional[dict]:
    """Collective: hash every file of ``folder`` (shared out over the ranks); rank 0 writes
    ``manifest.json`` (temporary name, then rename) and returns it (None on other ranks).
    ``extra`` is stored beside the file list (e.g. the save time used for pruning)."""
    rank, world = _world()
    names = _broadcast(list_files(folder) if rank == 0 else None)
    mine = {
        n: {"size": os.path.getsize(os.path.join(folder, n)), "sha256": file_sha256(os.path.join(folder, n))}
        for i, n in enumerate(names)
        if i % world == rank
    }
    files: dict = {}
    for part in _gather(mine):
        files.update(part)
    if rank != 0:
        return None
    manifest = {
        "version": MANIFEST_VERSION,
        "created": time.time(),
        **(extra or {}),
        "files": {n: files[n] for n in names},
    }
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(folder, MANIFEST))
    return manifest


def read_manifest(folder: str) -> Optional[dict]:
    """The manifest of a checkpoint folder; None when it has none."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' mapping")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointDamaged(f"{path}: unreadable checkpoint manifest ({e})") from None
    return manifest


def _inside(folder: str, name: str) -> bool:
    """Whether manifest entry ``name`` is a path inside ``folder`` (relative, no ``..``, no
    symlink out): an entry like ``../../etc/hostname`` must not be read, let alone trusted."""
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        return False
    root = os.path.realpath(folder)
    return os.path.realpath(os.path.join(folder, name)).startswith(root + os.sep)


def _listing_problems(folder: str, files: dict) -> list[str]:
    """Entries that point outside the folder, and files of the folder the manifest does not
    list: a loader reads every file of a checkpoint, so an unlisted one is unverified input."""
    bad = [
        f"{os.path.join(folder, n)}: the manifest entry {n!r} points outside the checkpoint"
        for n in files
        if not _inside(folder, n)
    ]
    bad += [
        f"{os.path.join(folder, n)}: not listed in {MANIFEST} (added or renamed after the "
        "save; remove it, or re-save the checkpoint)"
        for n in list_files(folder)
        if n not in files
    ]
    return bad


def check_listing(folder: str) -> None:
    """Not collective, cheap (a listing, no stat of listed files, no hash): the manifest's
    entries all lie inside ``folder`` and every file of it is listed. Readers call it before
    they read a checkpoint's first file (its model config), ahead of the full check at the
    weight load; a folder without a manifest passes (the load says "not verified")."""
    manifest = read_manifest(folder)
    bad = _listing_problems(folder, manifest["files"]) if manifest is not None else []
    if bad:
        raise CheckpointDamaged(f"checkpoint {folder} is damaged:\n  " + "\n  ".join(sorted(bad)))


def _size_problems(folder: str, files: dict) -> list[str]:
    """Missing files and files whose size differs from the manifest's."""
    bad = []
    for name, entry in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            bad.append(f"{path}: missing (the manifest lists {entry['size']} bytes)")
            continue
        size = os.path.getsize(path)
        if size != entry["size"]:
            what = "truncated" if size < entry["size"] else "longer than written"
            bad.append(f"{path}: {what}: {size} bytes, the manifest says {entry['size']}")
    return bad


def verify_checkpoint(folder: str, mode: str = "auto") -> str:
    """Collective: check ``folder`` against its manifest; raises ``CheckpointDamaged`` naming
    every bad file (on every rank): an entry outside the folder, a file the manifest does not
    list, a missing, truncated or (hashed) changed one. Returns what was checked: 'full',
    'sizes' or 'none' (no manifest)."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"checkpoint verify mode {mode!r}: expected one of {VERIFY_MODES}")
    rank, world = _world()
    manifest = read_manifest(folder)
    if manifest is None:
        return "none"
    files = manifest["files"]
    check_listing(folder)  # never stat or hash a path outside the checkpoint
    bad = _size_problems(folder, files)
    total = sum(e["size"] for e in files.values())
    full = mode == "full" or (mode == "auto" and total <= AUTO_FULL_BYTES * world)
    if full and not bad:
        for i, name in enumerate(sorted(files)):
            if i % world == rank and file_sha256(os.path.join(folder, name)) != files[name]["sha256"]:
                bad.append(
                    f"{os.path.join(folder, name)}: contents changed since it was saved "
                    f"(SHA-256 differs from {MANIFEST}; {files[name]['size']} bytes)"
                )
    bad = sorted({b for part in _gather(bad) for b in part})
    if bad:
        raise CheckpointDamaged(f"checkpoint {folder} is damaged:\n  " + "\n  ".join(bad))
    return "full" if full else "sizes"


# What torch.distributed.checkpoint (and Megatron's planner on top of it, which stores the
# ranks' save plans as `all_local_plans`) pickles into `.metadata`: the data classes and enums
# of DCP's metadata, planner and filesystem modules, plus these few names. Nothing else.
_DCP_DATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
_DCP_METADATA_GLOBALS = {
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


VERIFIED_NOTE = {
    "none": f"no {MANIFEST}: files not verified",
    "sizes": "file sizes verified",
    "full": "file sizes and SHA-256 verified",
}
"""What a load says about the checkpoint it read, by ``verify_checkpoint``'s result."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler that resolves only DCP's data classes, the names above and torch dtypes."""

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _DCP_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module in _DCP_DATA_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def check_dcp_metadata(folder: str):
    """Refuse every pickle megatron-core and DCP will open in ``folder`` unless it passes an
    allow-list, before they open it: DCP's ``.metadata`` (DCP's own metadata classes only),
    Megatron's ``common.pt`` and the pickled (non-tensor) items inside the shard files (torch's
    weights-only unpickler with ``layout.allowed_globals``). Megatron loads the last two with
    plain ``torch.load``, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns into a full unpickle
    that runs whatever a crafted file names; checked here, that environment changes nothing.
    Errors name the file. Returns DCP's metadata object (None for a folder without one), read
    with the allow-list: the one safe way to read it."""
    path = os.path.join(folder, DCP_METADATA)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - every failure is reported with the file
        raise CheckpointDamaged(
            f"{path}: refusing to read this checkpoint metadata ({type(e).__name__}: {e})"
        ) from None
    storage_data = getattr(metadata, "storage_data", None) or {}
    _check_data_files(path, folder, storage_data)
    _check_extents(folder, storage_data)
    common = os.path.join(folder, COMMON_FILE)
    if os.path.isfile(common):
        with open(common, "rb") as f:
            check_pickle(f, common)
    _check_byte_items(folder, metadata)
    return metadata


def check_pickle(stream, name: str) -> None:
    """Unpickle one torch-saved object with the weights-only unpickler and the allow-list;
    anything else in it (a callable that could run code) is refused, naming ``name``."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
        raise CheckpointDamaged(
            f"{name}: refusing to unpickle it: it holds something a checkpoint never does ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointDamaged(f"{name}: unreadable pickle ({e})") from None


def _check_byte_items(folder: str, metadata) -> None:
    """The pickled items (Megatron ShardedObjects, stored as DCP byte items) inside the shard
    files, each through ``check_pickle`` (DCP's loader unpickles them with weights_only=False)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    entries = getattr(metadata, "state_dict_metadata", None) or {}
    byte_keys = {k for k, v in entries.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        if getattr(index, "fqn", None) not in byte_keys:
            continue
        path = os.path.join(folder, info.relative_path)
        name = f"{path} (item {index.fqn})"
        if getattr(info, "transform_descriptors", None):
            raise CheckpointDamaged(
                f"{name}: stored through transforms "
                f"{info.transform_descriptors}; refusing to unpickle it unchecked"
            )
        with open(path, "rb") as f:
            f.seek(int(info.offset))
            check_pickle(io.BytesIO(f.read(int(info.length))), name)


def _check_data_files(path: str, folder: str, storage_data: dict) -> None:
    """DCP reads the data files ``.metadata`` names: each must be a file of this checkpoint (and
    so listed in its manifest, when it has one); a name like ``../../etc/hostname`` is refused
    before anything is opened."""
    names = {getattr(info, "relative_path", None) for info in storage_data.values()} - {None}
    bad = sorted(n for n in names if not isinstance(n, str) or not _inside(folder, n))
    if bad:
        raise CheckpointDamaged(
            f"{path}: names data files outside the checkpoint ({', '.join(map(repr, bad))}); "
            "refusing to read them"
        )


def _check_extents(folder: str, storage_data: dict) -> None:
    """Every data file must reach the end of the last item DCP's metadata places in it: a
    truncated shard is named here even without a manifest."""
    ends: dict[str, int] = {}
    for info in storage_data.values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
    bad = []
    for rel, end in sorted(ends.items()):
        path = os.path.join(folder, rel)
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size is None:
            bad.append(f"{path}: missing (the checkpoint metadata places data in it)")
        elif size < end:
            bad.append(f"{path}: truncated: {size} bytes, its data runs to byte {end}")
    if bad:
        raise CheckpointDamaged(f"checkpoint {folder} is damaged:\n  " + "\n  ".join(bad))
