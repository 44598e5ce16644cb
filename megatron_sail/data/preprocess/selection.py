"""Which records preprocessing keeps (``tools/preprocess_data.py --select``): a sample list of
the curriculum builder (one stage), or a complexity sidecar folder with an optional score range.

Both are JSONL records naming a sample by ``source`` (the absolute path of its input file) and
``key`` ('line N', 'item N' or the WebDataset key), the names the readers give records
(data/preprocess/formats.py); a sidecar record also carries ``score``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

from megatron_sail.data.preprocess.formats import named_files


@dataclass(frozen=True)
class Selection:
    """A sample list and the score range kept from it."""

    path: str
    """A JSONL file, a folder of ``*.jsonl`` files (a score sidecar), or a glob."""
    min_score: Optional[float] = None
    """Keep records with score >= this (records then need a score)."""
    max_score: Optional[float] = None
    """Keep records with score < this (half-open, so adjacent ranges never overlap)."""


def _files(path: str) -> list[str]:
    files = named_files(path, ".jsonl", exclude=(".rejects.jsonl",))
    if not files:
        raise FileNotFoundError(f"--select {path}: no sample list (JSONL with source and key)")
    return files


def load_selection(sel: Selection) -> set[tuple[str, str]]:
    """{(absolute source, key)} of the records to keep; a line without source and key (or
    without a score when a range is asked) is an error naming the file and line."""
    ranged = sel.min_score is not None or sel.max_score is not None
    keep = set()
    for f in _files(sel.path):
        with open(f) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    source, key = rec["source"], rec["key"]
                    score = rec.get("score") if ranged else None
                    if (
                        not isinstance(source, str)
                        or not isinstance(key, str)
                        or (ranged and not isinstance(score, (int, float)))
                    ):
                        raise TypeError
                except (json.JSONDecodeError, KeyError, TypeError):
                    need = "source, key and a numeric score" if ranged else "source and key"
                    raise ValueError(f"--select {f} line {n}: not a sample record (needs {need})") from None
                if sel.min_score is not None and score < sel.min_score:
                    continue
                if sel.max_score is not None and score >= sel.max_score:
                    continue
                keep.add((os.path.abspath(source), key))
    return keep


def filter_records(records: Iterator, keep: set, counts: dict) -> Iterator:
    """The records named in ``keep``, in input order; ``counts['selected']`` and
    ``counts['not_selected']`` count what passed and what was dropped."""
    for rec in records:
        if (os.path.abspath(rec.source), rec.key) in keep:
            counts["selected"] = counts.get("selected", 0) + 1
            yield rec
        else:
            counts["not_selected"] = counts.get("not_selected", 0) + 1
