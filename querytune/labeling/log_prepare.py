"""The input log a batch at a time on Arrow: read (`input_batches`), normalise (`normalize_plain`, `check_query` for
the rare cells), reject and deduplicate (`prepare`), with memory for the distinct queries only."""

from __future__ import annotations

import itertools
import json
import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from querytune.labeled import FORMATS, printable
from querytune.labeling.log_input import LabelInputError, input_files, parse_where, read_rows
from querytune.query import MAX_QUERY_CHARS, check_query

BATCH_ROWS = 1 << 17  # input rows normalised at a time: memory stays flat however long the log
ROWS_SCHEMA = pa.schema([("source", pa.large_string()), ("line", pa.int64()), ("normalized", pa.large_string())])


def normalize_plain(text: pa.Array, max_chars: int = MAX_QUERY_CHARS) -> tuple[pa.Array, pa.Array]:
    """(`check_query`'s normalised query, the cell stripped) for each plain cell, by Arrow compute: ASCII, no control
    character, no run of spaces once the ends are trimmed, 1 to `max_chars` long. There NFKC changes nothing and
    lower case is ASCII's. Null for every other cell (missing, not ASCII, tabs, ...): `check_query` decides those.

    >>> cells = pa.array([" Cheap THAI  ", "cheap  thai", "caf\\u00e9", "a\\tb", " ", None])
    >>> [a.to_pylist() for a in normalize_plain(cells)]
    [['cheap thai', None, None, None, None, None], ['Cheap THAI', None, None, None, None, None]]
    """
    stripped = pc.ascii_trim(text, " ")
    length = pc.binary_length(stripped)
    plain = pc.and_(
        pc.and_(pc.string_is_ascii(stripped), pc.invert(pc.match_substring_regex(stripped, r"[\x00-\x1f]|  "))),
        pc.and_(pc.greater(length, 0), pc.less_equal(length, max_chars)),
    )
    plain = pc.fill_null(plain, False)
    return pc.if_else(plain, pc.ascii_lower(stripped), pa.scalar(None, text.type)), pc.if_else(
        plain, stripped, pa.scalar(None, text.type)
    )


def first_of_each(table: pa.Table) -> pa.Table:
    """The first row (normalized, query) of each distinct normalised query, in order of first appearance (a
    dictionary encoding numbers values as they first appear)."""
    encoded = table["normalized"].combine_chunks().dictionary_encode()
    codes = encoded.indices.to_numpy()
    first_rows = np.flatnonzero(np.diff(np.maximum.accumulate(codes), prepend=-1) > 0)  # where a new code appears
    return pa.table({"normalized": encoded.dictionary, "query": table["query"].take(first_rows)})


Batch = tuple[str, pa.Array, pa.Array, Callable[[int], Any], dict[int, str]]


def _parquet_batches(file: Path, source: str, column: str, cond: tuple[str, str] | None) -> Iterator[Batch]:
    """A Parquet file's rows, `BATCH_ROWS` at a time, read by Arrow (see `input_batches`). Text cells stay bytes until
    `check_query` needs one, decoded with errors="surrogateescape": a cell a careless writer left not UTF-8 is one
    bad row, not a bad file."""

    def as_bytes(col: pa.Array) -> pa.Array | None:  # a text column's cells, UTF-8 unchecked; None for another type
        col = col.dictionary_decode() if pa.types.is_dictionary(col.type) else col
        text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_string_view(col.type)
        return col.cast(pa.large_binary()) if text else None

    def unreadable(e: Exception) -> LabelInputError:
        return LabelInputError(f"{file}: not a readable Parquet file: {printable(str(e))}")

    try:  # pyarrow raises several types for a file that is not (whole) Parquet
        reader = pq.ParquetFile(
            file, pre_buffer=False
        )  # pre-buffering keeps every column chunk read: memory would grow with the file
        names = reader.schema_arrow.names
    except Exception as e:
        raise unreadable(e) from None
    for col in [column] + ([cond[0]] if cond else []):
        if col not in names:
            raise LabelInputError(f"{file}: no column {col!r} (columns: {', '.join(names)})")
    batches, first = (
        reader.iter_batches(batch_size=BATCH_ROWS, columns=list(dict.fromkeys([column] + ([cond[0]] if cond else [])))),
        1,
    )
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:
            raise unreadable(e) from None
        if batch is None:
            return
        line, first = pa.array(np.arange(first, first + batch.num_rows)), first + batch.num_rows
        cells = batch.column(column)
        if cond:  # read_rows' rule: str(cell) == VALUE, so a missing cell matches "None"
            cond_bytes = as_bytes(batch.column(cond[0]))
            if cond_bytes is None:
                keep = pa.array([str(v) == cond[1] for v in batch.column(cond[0]).to_pylist()], pa.bool_())
            else:
                keep = pc.fill_null(
                    pc.equal(cond_bytes, pa.scalar(cond[1].encode("utf-8", "surrogateescape"), pa.large_binary())),
                    cond[1] == "None",
                )
            line, cells = line.filter(keep), cells.filter(keep)
        raw = as_bytes(cells)
        if raw is None:  # not a text column: every cell is a reject check_query names
            yield source, line, pa.nulls(len(cells), pa.large_string()), lambda i, cells=cells: cells[i].as_py(), {}
        else:

            def value(i: int, raw: pa.Array = raw) -> str | None:
                b = raw[i].as_py()
                return None if b is None else b.decode("utf-8", "surrogateescape")

            yield source, line, raw.view(pa.large_string()), value, {}


def input_batches(input_path: str | Path, column: str = "query", where: str | None = None) -> Iterator[Batch]:
    """Every data row of the input, `BATCH_ROWS` at a time, as (source, lines, text, value, errors): `text` holds the
    cells as Arrow text (null where a cell is not text; not checked as UTF-8), `value(i)` row i's cell as `read_rows`
    gives it, for the rows `check_query` must see, `errors` the rows that could not be read, with why. Parquet is read
    by Arrow; CSV and JSONL by `read_rows` (the csv and json modules decide their lines and errors)."""
    root = Path(input_path)
    for file in input_files(root):
        source = printable(str(file.relative_to(root)) if root.is_dir() else file.name)
        if FORMATS[file.suffix.lower()] == "parquet":
            yield from _parquet_batches(file, source, column, parse_where(where))
            continue
        items = read_rows(file, column, where)
        while chunk := list(itertools.islice(items, BATCH_ROWS)):
            rows = [item[0] if isinstance(item, tuple) else item for item in chunk]
            values = [row.text for row in rows]
            errors = {i: item[1] for i, item in enumerate(chunk) if isinstance(item, tuple)}
            text = pa.array(
                [
                    v if type(v) is str and v.isascii() and i not in errors else None for i, v in enumerate(values)
                ],  # isascii is O(1)
                pa.large_string(),
            )
            yield source, pa.array([row.line for row in rows], pa.int64()), text, values.__getitem__, errors


@dataclass
class Prepared:
    """The input as labeling needs it: its counts, and each distinct normalised query with its first spelling."""

    rows: int
    accepted: int
    rejected: int
    distinct: pa.Table  # normalized, query (the first spelling, stripped): in order of first appearance


def prepare(
    input_path: str | Path,
    out: str | Path,
    column: str = "query",
    where: str | None = None,
    max_chars: int = MAX_QUERY_CHARS,
) -> Prepared:
    """Read, normalise and deduplicate the input (no model), a batch at a time, and write `out/rows.parquet` and
    `out/rejects.jsonl` (each under a temporary name, renamed when whole): what `account_rows` + `save_accounting`
    give, with memory for the distinct queries only."""
    out = Path(out)
    rows_tmp, rejects_tmp = out / ".rows.parquet.tmp", out / ".rejects.jsonl.tmp"
    for tmp in (rows_tmp, rejects_tmp):
        tmp.unlink(missing_ok=True)  # a link left there is removed, never written through
    counts, firsts = [0, 0], []
    try:
        with (
            pq.ParquetWriter(rows_tmp, ROWS_SCHEMA) as rows_out,
            open(rejects_tmp, "w", encoding="utf-8") as rejects_out,
        ):
            for source, line, text, value, errors in input_batches(input_path, column, where):
                norm, spelling = normalize_plain(text, max_chars)
                fixed = []  # (row, normalised, stripped)
                for i in pc.indices_nonzero(pc.is_null(norm)).to_pylist():  # the rare rows: check_query decides
                    cell = value(i)
                    norm_i, reason = (None, errors[i]) if i in errors else check_query(cell, max_chars)
                    if reason is None:
                        fixed.append((i, norm_i, cell.strip()))
                        continue
                    raw = printable(cell) if isinstance(cell, str) else reprlib.repr(cell)  # as in account_rows
                    rejects_out.write(
                        json.dumps(
                            {"source": source, "line": line[i].as_py(), "reason": reason, "raw": raw},
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
                if fixed:
                    rows, fixes, stripped = zip(*fixed)
                    mask = np.zeros(len(norm), bool)
                    mask[list(rows)] = True
                    norm = pc.replace_with_mask(norm, pa.array(mask), pa.array(fixes, pa.large_string()))
                    spelling = pc.replace_with_mask(spelling, pa.array(mask), pa.array(stripped, pa.large_string()))
                keep = pc.is_valid(norm)
                accepted = norm.filter(keep)
                rows_out.write_table(
                    pa.table(
                        [pa.repeat(pa.scalar(source, pa.large_string()), len(accepted)), line.filter(keep), accepted],
                        schema=ROWS_SCHEMA,
                    )
                )
                firsts.append(first_of_each(pa.table({"normalized": accepted, "query": spelling.filter(keep)})))
                if (
                    sum(t.num_rows for t in firsts) > 2 * firsts[0].num_rows + BATCH_ROWS
                ):  # memory: a few times the distinct queries
                    firsts = [first_of_each(pa.concat_tables(firsts))]
                counts[0] += len(line)
                counts[1] += len(accepted)
        for tmp in (rows_tmp, rejects_tmp):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(rows_tmp, out / "rows.parquet")
        os.replace(rejects_tmp, out / "rejects.jsonl")
    finally:
        rows_tmp.unlink(missing_ok=True)
        rejects_tmp.unlink(missing_ok=True)
    none = pa.array([], pa.large_string())
    distinct = first_of_each(
        pa.concat_tables([pa.table({"normalized": none, "query": none}), *firsts])
    )  # a query recurs across batches
    return Prepared(counts[0], counts[1], counts[0] - counts[1], distinct)
