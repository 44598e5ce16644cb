"""Benchmark files in VLMEvalKit's TSV format: read items, resolve their images, write predictions.

A VLMEvalKit TSV has one row per question with at least ``index`` and ``question``; ``answer``,
options ``A``..``Z``, ``category``, ``hint``, ``image_path``, ``l2-category`` and other
benchmark-specific columns appear where the benchmark has them. ``image`` holds a base64-encoded
image, a Python list literal of several, or (to save space, as in MME) the ``index`` of an earlier
row whose image it shares. Without ``image``, ``image_path`` names image files, absolute or
relative to the TSV's folder. The prediction files we write keep every column except ``image``
and add ``prediction``, as VLMEvalKit's inference writes them.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import os
import sys
from dataclasses import dataclass, field

csv.field_size_limit(sys.maxsize)

_REF_MAX = 64
"""An ``image`` cell this short is the index of another row, not an image (VLMEvalKit's rule)."""


class BenchmarkFileError(ValueError):
    """A benchmark or predictions file that cannot be used, naming the file, row and reason."""


@dataclass
class Item:
    """One benchmark question: its TSV columns (strings, empty ones left out) and its images."""

    index: str
    """The row's ``index`` column."""
    row: dict
    """Every non-empty column except ``image`` (options, answer, category, ...)."""
    images: list = field(default_factory=list)
    """Raw image bytes (decoded base64) or file paths, in order."""
    problem: str = ""
    """Why the row's images cannot be used (bad base64, a missing file, a dangling reference),
    naming the file and row; such an item is not generated, and is scored and listed as a bad
    item instead of stopping the benchmark."""

    def get(self, key: str, default=None):
        """A column's value, or ``default`` when the row has none."""
        return self.row.get(key, default)


def _list_or_one(text: str) -> list[str]:
    """A cell holding a Python list literal of strings, or one string (VLMEvalKit's toliststr,
    parsed with ast.literal_eval rather than eval)."""
    if len(text) > 1 and text[0] == "[" and text[-1] == "]":
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return [text]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
    return [text]


def _decode(b64: str, where: str) -> bytes:
    """Base64 image bytes, or a clear error naming the row."""
    try:
        return base64.b64decode(b64, validate=False)
    except (binascii.Error, ValueError) as e:
        raise BenchmarkFileError(f"{where}: the image column is not valid base64 ({e})") from None


def _not_utf8(path: str) -> BenchmarkFileError:
    """The error for a file that is not UTF-8 text, naming its first bad line."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return BenchmarkFileError(
                    f"{path}: line {n} is not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1})"
                )
    return BenchmarkFileError(f"{path}: not UTF-8 text")


def read_rows(path: str, delimiter: str = "\t", lines: list | None = None) -> tuple[list[str], list[dict]]:
    """Header and rows of a TSV (or, with ``delimiter=','``, a CSV) as pandas writes them,
    quoted cells or not, cells as strings; ``lines``, when given, receives each row's first line
    number. Every problem is a BenchmarkFileError naming the file (and the line where there is
    one)."""
    if os.path.isdir(path):
        raise BenchmarkFileError(f"{path}: is a folder, not a file")
    if not os.path.isfile(path):
        raise BenchmarkFileError(f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = list(reader.fieldnames or [])
            if "index" not in header:
                raise BenchmarkFileError(f"{path}: no 'index' column (header: {header[:12]})")
            rows, start = [], reader.line_num + 1
            for row in reader:
                if lines is not None:
                    lines.append(start)
                start = reader.line_num + 1
                if None in row:
                    raise BenchmarkFileError(f"{path}: line {reader.line_num} has more cells than the header")
                rows.append({k: ("" if v is None else v) for k, v in row.items()})
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except csv.Error as e:
        raise BenchmarkFileError(f"{path}: not a readable table ({e})") from None
    except OSError as e:
        raise BenchmarkFileError(f"{path}: cannot read ({e.strerror or e})") from None
    return header, rows


def read_items(
    path: str,
    limit: int | None = None,
    need_images: bool = True,
    require: tuple = (),
    images_if_no: tuple = (),
) -> list[Item]:
    """The items of a benchmark TSV (the first ``limit`` ones when given), images resolved.

    Rows without any image are kept (text-only questions); with ``need_images`` False the image
    column is not decoded (scoring an existing predictions file needs only the metadata), nor
    when the file has one of the ``images_if_no`` columns. A row whose images cannot be resolved
    is kept with ``Item.problem`` saying why. ``require`` names further columns the caller
    needs (an error when the file lacks one)."""
    header, rows = read_rows(path)
    for col in ("question", *require):
        if col not in header:
            raise BenchmarkFileError(f"{path}: no {col!r} column (header: {header[:12]})")
    need_images = need_images and not any(c in header for c in images_if_no)
    by_index = {r["index"]: r.get("image", "") for r in rows}
    if len(by_index) != len(rows):
        seen: set = set()
        twice = next(r["index"] for r in rows if r["index"] in seen or seen.add(r["index"]))
        raise BenchmarkFileError(f"{path}: the 'index' column repeats a value ({twice!r})")
    root = os.path.dirname(os.path.abspath(path))
    items = []
    for r in rows[:limit] if limit else rows:
        where = f"{path}: row index={r['index']}"
        images, problem = [], ""
        if need_images:
            try:
                images = _images_of(r, by_index, root, where)
            except BenchmarkFileError as e:
                problem = str(e)
        meta = {k: v for k, v in r.items() if k != "image" and v != ""}
        items.append(Item(index=r["index"], row=meta, images=images, problem=problem))
    return items


def _images_of(row: dict, by_index: dict, root: str, where: str) -> list:
    """Image bytes or paths of one row: base64 cells (following index references), else paths."""
    cell = row.get("image", "")
    if cell:
        if len(cell) <= _REF_MAX:
            ref = by_index.get(cell, "")
            if len(ref) <= _REF_MAX:
                raise BenchmarkFileError(f"{where}: image refers to index {cell!r}, which holds no image")
            cell = ref
        return [_decode(b, where) for b in _list_or_one(cell)]
    paths = [p for p in _list_or_one(row.get("image_path", "")) if p]
    out = []
    for p in paths:
        full = p if os.path.isabs(p) else os.path.join(root, p)
        if not os.path.isfile(full):
            raise BenchmarkFileError(f"{where}: image file {full} not found")
        out.append(full)
    return out


def write_predictions(path: str, header: list[str], items: list[Item], predictions: dict) -> None:
    """Write ``path``: the benchmark's columns except ``image``, plus ``prediction``
    (temporary name, then rename, so an interrupted write leaves no half file)."""
    cols = [c for c in header if c not in ("image", "prediction")] + ["prediction"]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        for it in items:
            w.writerow(
                [predictions.get(it.index, "") if c == "prediction" else it.row.get(c, "") for c in cols]
            )
    os.replace(tmp, path)


def write_tsv(path: str, header: list[str], rows: list[dict]) -> None:
    """Write a benchmark TSV (the demo benchmark builder and tests use it), atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(c, "") for c in header])
    os.replace(tmp, path)
