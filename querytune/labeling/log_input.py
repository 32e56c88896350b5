"""The input log, row by row: its files, `--where`, each row's cell (`read_rows`), and
every row accepted or rejected (`account_rows`: the per-row definition `log_prepare.prepare` is held to)."""

from __future__ import annotations

import csv
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from querytune.labeled import FORMATS, csv_records, jsonl_records, printable
from querytune.query import MAX_QUERY_CHARS, check_query


class LabelInputError(ValueError):
    """An input that cannot be read at all (missing, no supported files, no such column)."""


@dataclass(frozen=True)
class InputRow:
    source: str  # file name relative to the input (the file's own name for a single file)
    line: int  # JSONL / CSV: physical line (CSV header = 1); Parquet: 1-based row
    text: Any  # the cell as read (may be missing or not a string)


def input_files(path: str | Path) -> list[Path]:
    """The supported files of `path` (itself, or those under a folder, sorted)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in FORMATS:
            raise LabelInputError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(sorted(FORMATS))})")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise LabelInputError(f"{path}: no {', '.join(sorted(FORMATS))} files in this folder")
        return files
    raise LabelInputError(f"{path}: no such file or folder")


def parse_where(where: str | None) -> tuple[str, str] | None:
    """`COLUMN=VALUE` -> (column, value).

    >>> parse_where("period=late")
    ('period', 'late')
    """
    if not where:
        return None
    if "=" not in where:
        raise LabelInputError(f"--where {where!r}: write COLUMN=VALUE, e.g. period=late")
    col, value = where.split("=", 1)
    return col.strip(), value.strip()


def read_rows(
    path: str | Path, column: str = "query", where: str | None = None
) -> Iterator[InputRow | tuple[InputRow, str]]:
    """Every data row of the input: an `InputRow`, or (`InputRow`, reason) for one that cannot be read
    (broken JSON, a row without the column). A file without the column at all is an error. `where`
    (`COLUMN=VALUE`) keeps only the rows whose column holds that value (compared as text)."""
    cond = parse_where(where)
    root = Path(path)
    for file in input_files(root):
        source = str(file.relative_to(root)) if root.is_dir() else file.name
        kind = FORMATS[file.suffix.lower()]
        if kind == "parquet":
            names, values, cond_values = _parquet_columns(file, column, cond[0] if cond else None)
            for col in [column] + ([cond[0]] if cond else []):
                if col not in names:
                    raise LabelInputError(f"{file}: no column {col!r} (columns: {', '.join(names)})")
            keep = [str(v) == cond[1] for v in cond_values] if cond else None
            for i, value in enumerate(values, 1):
                if keep is None or keep[i - 1]:
                    yield InputRow(source, i, value)
        elif kind == "csv":
            try:
                header, records = csv_records(file, errors="surrogateescape")
            except csv.Error as e:  # the header itself (a row after it is a reject)
                raise LabelInputError(f"{file}: not readable as CSV: {e}") from None
            for col in [column] + ([cond[0]] if cond else []):
                if col not in header:
                    raise LabelInputError(
                        f"{file}: no column {col!r} in the header ({printable(', '.join(header))}); "
                        "choose one with --column"
                    )
            for line, rec, error in records:
                if cond and not (isinstance(rec, dict) and str(rec.get(cond[0])) == cond[1]):
                    continue
                yield (InputRow(source, line, None), error) if error else InputRow(source, line, rec[column])
        else:
            for line, rec, error in jsonl_records(file, errors="surrogateescape"):
                if error:
                    yield InputRow(source, line, rec[:200]), error
                elif cond and not (isinstance(rec, dict) and str(rec.get(cond[0])) == cond[1]):
                    continue
                elif isinstance(rec, str):
                    yield InputRow(source, line, rec)
                elif not isinstance(rec, dict) or column not in rec:
                    yield InputRow(source, line, None), f"no field {column!r}"
                else:
                    yield InputRow(source, line, rec[column])


def _parquet_columns(file: Path, column: str, cond: str | None) -> tuple[list[str], list[Any], list[Any]]:
    """The file's column names and the values of `column` and `cond` (if the file has them). Text cells are decoded
    one by one with errors="surrogateescape", so a cell a careless writer left not UTF-8 is one bad row, not a bad
    file (`check_query` rejects it)."""

    def values(table: pa.Table, name: str) -> list[Any]:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_string_view(col.type):
            return [
                None if v is None else v.decode("utf-8", "surrogateescape")
                for v in col.cast(pa.large_binary()).to_pylist()
            ]
        return col.to_pylist()

    try:
        names = pq.read_schema(file).names
        wanted = [c for c in dict.fromkeys([column, cond]) if c in names]
        table = pq.read_table(file, columns=wanted)
        return names, values(table, column) if column in names else [], values(table, cond) if cond in names else []
    except Exception as e:  # pyarrow raises several types for a file that is not (whole) Parquet
        raise LabelInputError(f"{file}: not a readable Parquet file: {printable(str(e))}") from None


@dataclass
class Accounting:
    """Every row of an input, accepted (row -> normalised query) or rejected (file, line, reason, raw)."""

    rows: int
    mapping: dict[str, list]  # source, line, normalized: one entry per accepted row
    rejects: list[dict]  # source, line, reason, raw: one per rejected row
    first_spelling: dict[str, str]  # each distinct normalised query -> its first spelling in the input


def account_rows(
    input_path: str | Path, column: str = "query", where: str | None = None, max_chars: int = MAX_QUERY_CHARS
) -> Accounting:
    """Read and normalise every row of the input (no model), one row at a time in Python: the definition of what
    `prepare` writes as rows.parquet and rejects.jsonl, kept to hold it to (tests, eval/labeling_prepare.py)."""
    acc = Accounting(0, {"source": [], "line": [], "normalized": []}, [], {})
    for item in read_rows(input_path, column, where):
        acc.rows += 1
        row, reason = item if isinstance(item, tuple) else (item, None)
        norm = None
        if reason is None:
            norm, reason = check_query(row.text, max_chars)
        if reason is not None:  # raw as UTF-8 can hold it: a bad byte shows as \\xe9, a non-text cell as its short repr
            raw = printable(row.text) if isinstance(row.text, str) else reprlib.repr(row.text)
            acc.rejects.append({"source": printable(row.source), "line": row.line, "reason": reason, "raw": raw})
            continue
        acc.mapping["source"].append(printable(row.source))
        acc.mapping["line"].append(row.line)
        acc.mapping["normalized"].append(norm)
        acc.first_spelling.setdefault(norm, row.text.strip())
    return acc
