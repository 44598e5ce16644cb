"""InternVL's dataset meta file -> one packed dataset per entry + the ``--data-path`` blend.

InternVL trains from a JSON object naming its datasets (``internvl_chat/shell/data/*.json`` in
the InternVL repository)::

    {"ai2d_train_12k": {"root": "playground/data/ai2d/",
                        "annotation": "playground/opensource/ai2d_train_12k.jsonl",
                        "data_augment": false, "repeat_time": 1, "length": 12413,
                        "max_dynamic_patch": 6}, ...}

Each entry becomes its own packed dataset ``OUT/<name>`` (its ``root`` is the image root, its
``max_dynamic_patch`` the max tiles), preprocessed with the same flags otherwise. InternVL
concatenates the entries, each read ``repeat_time`` times per epoch (a fraction keeps that share
of the samples), so an entry's share of the training stream is ``repeat_time x its size``. The
blend reproduces that share in packed rows: weight = repeat_time x rows, normalized to sum to 1.
Relative ``root`` / ``annotation`` paths resolve against the working directory, as InternVL's
training scripts do (they run from ``internvl_chat/``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_sail.config.data import PreprocessConfig

KNOWN_KEYS = {"root", "annotation", "repeat_time", "max_dynamic_patch", "data_augment", "length"}
BLEND_FILE = "blend.json"
DATA_PATH_FILE = "data_path.txt"
WEIGHTING = "repeat_time x rows, normalized"


@dataclass
class MetaEntry:
    """One dataset of an InternVL meta file."""

    name: str
    """The entry's key (also the output dataset's file name, made filesystem-safe)."""
    root: str
    """Image root: relative image paths of the annotation resolve against it."""
    annotation: str
    """The annotation file (InternVL JSONL, or any other input this tool reads)."""
    repeat_time: float = 1.0
    """Times the entry is read per epoch (a fraction: that share of it); the blend weight factor."""
    max_dynamic_patch: Optional[int] = None
    """Max tiles for this entry's images (None: --max-tiles)."""
    data_augment: bool = False
    """InternVL's train-time JPEG-quality augmentation; not applied here (reported)."""
    length: Optional[int] = None
    """Sample count the meta file claims (informational; compared with the records read)."""
    ignored: tuple[str, ...] = ()
    """Keys of the entry this tool does not read (reported, e.g. video frame bounds)."""


def is_meta_file(path: str) -> bool:
    """A JSON object whose values are objects with an ``annotation`` (not a data file)."""
    if not path.endswith(".json") or not os.path.isfile(path):
        return False
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16).lstrip()
    if not head.startswith("{"):
        return False
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(v, dict) and "annotation" in v for v in obj.values())
    )


def read_meta(path: str, base_dir: Optional[str] = None) -> list[MetaEntry]:
    """The entries of a meta file, validated; relative paths joined to ``base_dir`` (cwd)."""
    base_dir = base_dir or os.getcwd()
    with open(path, "r", encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: an InternVL meta file is a non-empty JSON object of datasets")
    entries, names = [], set()
    for name, spec in obj.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: expected an object, got {type(spec).__name__}")
        for key in ("root", "annotation"):
            if not isinstance(spec.get(key), str):
                raise ValueError(f"{where}: '{key}' must be a string path")
        repeat = spec.get("repeat_time", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not repeat > 0:
            raise ValueError(f"{where}: repeat_time must be a number > 0, got {repeat!r}")
        mdp = spec.get("max_dynamic_patch")
        if mdp is not None and (isinstance(mdp, bool) or not isinstance(mdp, int) or mdp < 1):
            raise ValueError(f"{where}: max_dynamic_patch must be an integer >= 1, got {mdp!r}")
        safe = _safe_name(name)
        if safe in names:
            raise ValueError(f"{where}: output name {safe!r} is used by another entry")
        names.add(safe)
        entries.append(
            MetaEntry(
                name=name,
                root=os.path.join(base_dir, spec["root"]),
                annotation=os.path.join(base_dir, spec["annotation"]),
                repeat_time=float(repeat),
                max_dynamic_patch=mdp,
                data_augment=bool(spec.get("data_augment", False)),
                length=spec.get("length") if isinstance(spec.get("length"), int) else None,
                ignored=tuple(sorted(set(spec) - KNOWN_KEYS)),
            )
        )
    return entries


def _safe_name(name: str) -> str:
    """A dataset name usable as a file name (no separators, no leading dot)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".") or "dataset"


def output_name(entry: MetaEntry) -> str:
    """File-system safe output name of an entry."""
    return _safe_name(entry.name)


def entry_config(cfg: PreprocessConfig, entry: MetaEntry, out_dir: str) -> PreprocessConfig:
    """The one-dataset config of an entry: its annotation, image root and max tiles."""
    tiling = cfg.tiling
    if entry.max_dynamic_patch is not None:
        tiling = dataclasses.replace(
            tiling,
            max_tiles=entry.max_dynamic_patch,
            min_tiles=min(tiling.min_tiles, entry.max_dynamic_patch),
        )
    return dataclasses.replace(
        cfg,
        inputs=[entry.annotation],
        image_root=entry.root,
        format=None,
        output_prefix=os.path.join(out_dir, output_name(entry)),
        tiling=tiling,
    )


def blend(entries: list[MetaEntry], summaries: list[dict]) -> list[tuple[float, str]]:
    """(weight, prefix) per entry: repeat_time x rows, normalized (InternVL's share per epoch)."""
    raw = [e.repeat_time * s["rows"] for e, s in zip(entries, summaries)]
    total = sum(raw)
    return [(round(r / total, 6), s["output_prefix"]) for r, s in zip(raw, summaries)]


def run_meta(
    cfg: PreprocessConfig,
    meta_path: str,
    run_one: Callable[[PreprocessConfig], tuple[int, dict]],
    log: Callable[[str], None] = print,
    base_dir: Optional[str] = None,
) -> tuple[int, list[dict]]:
    """Preprocess every entry (``run_one`` is preprocess.run) and write the blend.

    ``cfg.output_prefix`` is the output directory. Returns (exit code, one summary per entry
    plus a last one for the blend). Every entry is attempted; if any fails (or packs no rows),
    the exit code is 1 and no blend file is written.
    """
    if cfg.num_shards != 1:
        raise ValueError(
            "an InternVL meta file is preprocessed in one run (--num-shards 1); "
            "shard its annotation files one by one instead"
        )
    entries = read_meta(meta_path, base_dir)
    out_dir = cfg.output_prefix
    os.makedirs(out_dir, exist_ok=True)
    for stale in (BLEND_FILE, DATA_PATH_FILE):  # an older blend must not outlive a failed rebuild
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    summaries, failed = [], []
    for entry in entries:
        if entry.ignored:
            log(
                f"note: {entry.name}: keys not used here: {', '.join(entry.ignored)} (videos take "
                f"--video-frames frames)"
            )
        if entry.data_augment:
            log(
                f"note: {entry.name}: data_augment is not applied (InternVL's random JPEG-quality "
                "augmentation happens at load time; these rows store the images unchanged)"
            )
        try:
            code, summary = run_one(entry_config(cfg, entry, out_dir))
        except (ValueError, FileNotFoundError) as e:
            code, summary = 2, {"output_prefix": os.path.join(out_dir, output_name(entry)), "error": str(e)}
        summary = {
            "dataset": entry.name,
            "repeat_time": entry.repeat_time,
            "max_tiles": entry.max_dynamic_patch or cfg.tiling.max_tiles,
            "data_augment": "not applied" if entry.data_augment else False,
            **summary,
        }
        if entry.length is not None and "records" in summary and summary["records"] != entry.length:
            summary["meta_length"] = entry.length
            log(
                f"note: {entry.name}: meta file says length {entry.length}, the annotation has "
                f"{summary['records']} records"
            )
        if code == 0 and not summary.get("rows"):
            code, summary["error"] = 1, "no rows packed; cannot be part of the blend"
        if code != 0:
            failed.append(entry.name)
        summaries.append(summary)
    if failed:
        return 1, summaries + [{"error": f"datasets failed: {', '.join(failed)}; no blend written"}]
    weights = blend(entries, summaries)
    data_path = " ".join(f"{w} {p}" for w, p in weights)
    doc = {
        "meta": os.path.abspath(meta_path),
        "weighting": WEIGHTING,
        "data_path": data_path,
        "datasets": [
            {
                "name": e.name,
                "prefix": p,
                "weight": w,
                "repeat_time": e.repeat_time,
                "rows": s["rows"],
                "samples": s["samples"],
            }
            for e, s, (w, p) in zip(entries, summaries, weights)
        ],
    }
    _write_atomic(os.path.join(out_dir, BLEND_FILE), json.dumps(doc, indent=1) + "\n")
    _write_atomic(os.path.join(out_dir, DATA_PATH_FILE), data_path + "\n")
    return 0, summaries + [
        {"blend": os.path.join(out_dir, BLEND_FILE), "weighting": WEIGHTING, "data_path": data_path}
    ]


def _write_atomic(path: str, text: str) -> None:
    """Write to a temporary name, then rename (a reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
