"""Predictions files as VLMEvalKit and tools/evaluate.py write them: ``.xlsx`` (VLMEvalKit's
default, written by pandas with xlsxwriter), ``.tsv`` and ``.csv`` (pandas ``to_csv``, every cell
quoted). Each has one row per item with at least ``index`` and ``prediction``.

Cells are read as text the way VLMEvalKit's ``load`` sees them where that is unambiguous: an
integer-valued number cell of a spreadsheet is its integer ('5', not '5.0'), any other number is
Python's shortest form. An empty cell is the empty string (pandas would make it NaN and its
scorers the text 'nan'; docs/evaluation.md lists that difference)."""

from __future__ import annotations

import datetime
import os

from megatron_sail.eval.tsv import BenchmarkFileError, read_rows

FORMATS = (".xlsx", ".tsv", ".csv")
"""Predictions file suffixes read here."""


def cell_text(value) -> str:
    """A spreadsheet cell as the text of the predictions table."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat(sep=" ") if isinstance(value, datetime.datetime) else value.isoformat()
    return str(value)


def _read_xlsx(path: str, lines: list) -> tuple[list[str], list[dict]]:
    """Header and rows of the first sheet of a workbook; ``lines`` receives each row's number."""
    try:
        import openpyxl
    except ImportError:
        raise BenchmarkFileError(
            f"{path}: reading .xlsx needs openpyxl (pip install -r requirements.txt)"
        ) from None
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # noqa: BLE001 - zip, XML and openpyxl errors all mean "not a workbook"
        raise BenchmarkFileError(f"{path}: not a readable .xlsx workbook ({type(e).__name__}: {e})") from None
    try:
        sheet = wb.worksheets[0]
        sheet_rows = sheet.iter_rows(values_only=True)
        header = [cell_text(v) for v in next(sheet_rows, ())]
        while header and not header[-1]:
            header.pop()
        rows = []
        for n, values in enumerate(sheet_rows, start=2):
            cells = [cell_text(v) for v in values]
            if not any(cells):
                continue
            if any(cells[len(header) :]):
                raise BenchmarkFileError(f"{path}: row {n} has more cells than the header")
            rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
            lines.append(n)
    finally:
        wb.close()
    return header, rows


def read_table(path: str, lines: list | None = None) -> tuple[list[str], list[dict]]:
    """Header and rows (cells as text) of a predictions file, by its suffix; ``lines``, when
    given, receives each row's line (text) or row (workbook) number."""
    lines = [] if lines is None else lines
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise BenchmarkFileError(
            f"{path}: unknown predictions format {suffix or '(none)'!r}; use one of {', '.join(FORMATS)}"
        )
    if suffix == ".xlsx":
        if not os.path.isfile(path):
            raise BenchmarkFileError(f"{path}: no such file")
        header, rows = _read_xlsx(path, lines)
        if "index" not in header:
            raise BenchmarkFileError(f"{path}: no 'index' column (header: {header[:12]})")
        return header, rows
    return read_rows(path, "," if suffix == ".csv" else "\t", lines)


def canonical_index(text: str) -> str:
    """An index as both files agree on it: VLMEvalKit stores integer indices as integers
    ('0012' and '12.0' are 12), other indices as they are."""
    t = text.strip()
    try:
        value = float(t)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() and t.lstrip("-").replace(".", "", 1).isdigit() else text


def read_predictions(path: str) -> dict[str, str]:
    """canonical index -> prediction text of a predictions file. A repeated index is an error
    naming both rows (which of two answers counts would be a guess)."""
    lines: list = []
    header, rows = read_table(path, lines)
    if "prediction" not in header:
        raise BenchmarkFileError(f"{path}: no 'prediction' column (header: {header[:12]})")
    out, seen = {}, {}
    where = "rows" if path.lower().endswith(".xlsx") else "lines"
    for n, r in zip(lines, rows):
        key = canonical_index(r["index"])
        if key in seen:
            raise BenchmarkFileError(
                f"{path}: index {r['index']!r} appears twice ({where} {seen[key]} and {n})"
            )
        seen[key] = n
        out[key] = r["prediction"]
    return out
