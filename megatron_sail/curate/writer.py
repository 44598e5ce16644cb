"""Write stage: one WebDataset shard (+ rejects) per input shard, made visible only when complete.

``NAME.tar`` and ``NAME.rejects.jsonl`` are written as ``*.tmp`` and renamed when the shard is
finished; then ``done/NAME.json`` (counts) is written the same way. A shard counts as done only
when its marker exists, so a kill at any point leaves either a finished shard or one that a
rerun redoes from the start: every input sample ends up exactly once in an output shard or in
a rejects file. ``done_manifest.json`` lists the finished shards of the whole output folder.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Optional

from megatron_sail.curate.reader import Sample, dump_json
from megatron_sail.data.images.imageinfo import clean_message
from megatron_sail.platform.parent_watch import check_parent

DONE_DIR = "done"
MANIFEST = "done_manifest.json"


def write_atomic(path: str, data: bytes) -> None:
    """Write under a temporary name of this process (array tasks rebuild the same manifest and
    report at the same time), fsync, rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def done_marker(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, DONE_DIR, name + ".json")


def is_done(out_dir: str, name: str, output_suffix: str = ".tar") -> bool:
    """A shard is finished when its marker and its output (``NAME.tar``; the signature pass:
    ``NAME.sig.npz``) both exist."""
    return os.path.isfile(done_marker(out_dir, name)) and os.path.isfile(
        os.path.join(out_dir, name + output_suffix)
    )


def write_manifest(
    out_dir: str, totals: tuple[str, ...] = ("samples", "captioned"), output_suffix: str = ".tar"
) -> str:
    """done_manifest.json: every finished shard's marker, by name, and the sums of ``totals``
    over them (rebuilt from the markers, so concurrent array tasks never lose each other's
    entries)."""
    folder = os.path.join(out_dir, DONE_DIR)
    shards = {}
    for fname in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if fname.endswith(".json") and is_done(out_dir, fname[:-5], output_suffix):
            with open(os.path.join(folder, fname), encoding="utf-8") as f:
                shards[fname[:-5]] = json.load(f)
    path = os.path.join(out_dir, MANIFEST)
    sums = {k: sum(s.get(k, 0) for s in shards.values()) for k in totals}
    write_atomic(path, json.dumps({"shards": shards, **sums}, indent=1).encode())
    return path


class ShardWriter:
    """Output of one shard: kept samples into the tar, the others into the rejects file (recaption
    and filter_data both write through it; ``kept_name`` is what the marker calls the kept count)."""

    def __init__(self, out_dir: str, name: str, kept_name: str = "captioned"):
        self.out_dir, self.name, self.kept_name = out_dir, name, kept_name
        os.makedirs(out_dir, exist_ok=True)
        self.tar_path = os.path.join(out_dir, name + ".tar")
        self.rejects_path = os.path.join(out_dir, name + ".rejects.jsonl")
        self.tar = tarfile.open(self.tar_path + ".tmp", "w", format=tarfile.PAX_FORMAT)
        self.rejects = open(self.rejects_path + ".tmp", "wb")
        self.keys: set[str] = set()
        self.captioned = 0
        self.by_reason: dict[str, int] = {}

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self.tar.addfile(info, io.BytesIO(data))

    def add_members(self, key: str, members: dict) -> None:
        """A sample's members as given ({suffix: bytes}, in order), under the (safe) key."""
        self.keys.add(key)
        for ext, data in members.items():
            self._member(f"{key}.{ext}", data)
        self.captioned += 1

    def reject_line(self, key: str, reason: str, line: dict) -> None:
        """One rejects line as given (``reason`` counted; the detail is cleaned of addresses)."""
        self.keys.add(key)
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if "detail" in line:
            line = dict(line, detail=clean_message(line["detail"]))
        self.rejects.write(dump_json(line) + b"\n")

    def seen(self, key: str) -> bool:
        """Whether the key was already written or rejected in this shard (a duplicate key)."""
        return key in self.keys

    def add(self, sample: Sample, caption: str, provenance: dict) -> None:
        """The original image bytes, the new caption, the original text, provenance json."""
        self.keys.add(sample.key)
        self._member(f"{sample.key}.{sample.ext}", sample.image)
        self._member(f"{sample.key}.txt", caption.encode("utf-8", "backslashreplace"))
        if sample.original_text is not None:
            self._member(
                f"{sample.key}.original.txt", sample.original_text.encode("utf-8", "backslashreplace")
            )
        self._member(
            f"{sample.key}.json",
            dump_json(
                {
                    "key": sample.key,
                    "source": sample.where,
                    "caption": caption,
                    "original_text": sample.original_text,
                    "original": sample.original,
                    "provenance": provenance,
                }
            ),
        )
        self.captioned += 1

    def reject(self, sample: Sample, reason: str, detail: str, provenance: Optional[dict] = None) -> None:
        """One line in the rejects file: which sample, why, and what was generated if anything."""
        self.keys.add(sample.key)
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        # no object addresses in a detail: two identical runs write byte-identical rejects
        line = {"key": sample.key, "source": sample.where, "reason": reason, "detail": clean_message(detail)}
        if provenance:
            line["provenance"] = provenance
        self.rejects.write(dump_json(line) + b"\n")

    def commit(self, info: dict, extra: Optional[dict] = None) -> dict:
        """Close, fsync, rename both files, write the ``extra`` files ({relative path: bytes},
        e.g. a per-shard report), then the done marker (last: it means done). A worker whose run
        was killed meanwhile commits nothing (parent_watch.check_parent)."""
        self.tar.close()
        self.rejects.flush()
        os.fsync(self.rejects.fileno())
        self.rejects.close()
        with open(self.tar_path + ".tmp", "rb+") as f:
            os.fsync(f.fileno())
        check_parent(f"shard {self.name}")
        os.replace(self.rejects_path + ".tmp", self.rejects_path)
        os.replace(self.tar_path + ".tmp", self.tar_path)
        for rel, data in (extra or {}).items():
            os.makedirs(os.path.dirname(os.path.join(self.out_dir, rel)), exist_ok=True)
            write_atomic(os.path.join(self.out_dir, rel), data)
        rejected = sum(self.by_reason.values())
        marker = dict(
            info,
            samples=self.captioned + rejected,
            **{self.kept_name: self.captioned},
            rejected=rejected,
            rejects_by_reason=dict(sorted(self.by_reason.items())),
        )
        os.makedirs(os.path.join(self.out_dir, DONE_DIR), exist_ok=True)
        write_atomic(done_marker(self.out_dir, self.name), json.dumps(marker, indent=1).encode())
        return marker

    def abort(self) -> None:
        """Drop the partial files (a failed shard is redone from the start)."""
        for f in (self.tar, self.rejects):
            try:
                f.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
        for p in (self.tar_path + ".tmp", self.rejects_path + ".tmp"):
            if os.path.exists(p):
                os.remove(p)
