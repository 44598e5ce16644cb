"""The score sidecar: one JSONL file per scored shard, one record per sample.

    {"source": "/abs/data/sft.jsonl", "key": "line 12", "score": 3.1, "method": "heuristic", ...}

A shard is ``samples_per_shard`` consecutive records of one input file; its file
``<stem>-<hash of the path>-<shard:05d>.scores.jsonl`` is written under a temporary name and
renamed when the shard is complete, so a resumed run skips every shard whose file exists (as
recaption skips finished shards). Records that could not be scored go to the shard's
``.rejects.jsonl`` with a reason. Readers key scores by (absolute source path, key): the same
names preprocessing gives records (``--select`` in tools/preprocess_data.py)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

from megatron_sail.data.preprocess.formats import named_files

SUFFIX = ".scores.jsonl"
REJECTS = ".rejects.jsonl"


def shard_name(source: str, shard: int) -> str:
    """File stem of one shard of an input file (unique per absolute path)."""
    stem = os.path.splitext(os.path.basename(source))[0]
    digest = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:8]
    return f"{stem}-{digest}-{shard:05d}"


def shard_done(out_dir: str, source: str, shard: int) -> bool:
    """Whether this shard's scores were written completely by an earlier run."""
    return os.path.isfile(os.path.join(out_dir, shard_name(source, shard) + SUFFIX))


def _write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Write rows under a temporary name, then rename (a crash never leaves half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def write_shard(out_dir: str, source: str, shard: int, records: list[dict], rejects: list[dict]) -> str:
    """Publish one finished shard (rejects first: the scores file is the completion mark)."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, shard_name(source, shard))
    _write_jsonl(base + REJECTS, rejects)
    _write_jsonl(base + SUFFIX, records)
    return base + SUFFIX


def score_files(path: str) -> list[str]:
    """The sidecar files named by a folder (all its shards), one file, or a glob."""
    files = named_files(path, SUFFIX)
    if not files:
        raise FileNotFoundError(f"{path}: no score files (*{SUFFIX}); run tools/score_complexity.py")
    return files


def read_scores(path: str, method: Optional[str] = None) -> list[dict]:
    """Every score record under ``path`` (sorted by source, then position in the file).
    ``method``: keep only that method's records. A line that is not a record with a source,
    a key and a numeric score is an error naming the file and line."""
    out = []
    for f in score_files(path):
        with open(f) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    ok = (
                        isinstance(rec["source"], str)
                        and isinstance(rec["key"], str)
                        and isinstance(rec["score"], (int, float))
                    )
                except (json.JSONDecodeError, KeyError, TypeError):
                    ok = False
                if not ok:
                    raise ValueError(f"{f} line {n}: not a score record (needs source, key, numeric score)")
                if method is None or rec.get("method") == method:
                    out.append(rec)
    out.sort(key=lambda r: (r["source"], key_order(r["key"])))
    return out


def key_order(key: str) -> tuple:
    """Sort key of a record key: 'line 9' before 'line 10'; WebDataset keys as text."""
    kind, _, num = key.partition(" ")
    return (kind, int(num), "") if num.isdigit() else (kind, -1, key)


def score_index(records: list[dict]) -> dict[tuple[str, str], float]:
    """{(source, key): score}."""
    return {(r["source"], r["key"]): float(r["score"]) for r in records}
