"""Offline batch labeling: a query log in, one parse per distinct normalised query out, every row accounted for.

    querytune label logs/ --model runs/sft --out runs/labels [--column query] [--backend transformers|vllm]

read (CSV / JSONL / Parquet, a file or a folder of them) -> normalise (NFKC, case, whitespace) -> reject what
cannot be a query (line and reason in `rejects.jsonl`) -> deduplicate -> label each distinct query once, in
batches of similar length -> Parquet shards. Reading, normalising and deduplicating (`prepare`) run on Arrow arrays a
batch at a time, so memory follows the distinct queries, not the rows: plain ASCII cells are normalised by Arrow
compute, the rare others by `check_query`, the per-row definition (`account_rows` applies it row by row;
tests/test_label_scale.py holds the two equal). The output folder holds:

    labels/part-00000.parquet ...  query, normalized, parse (JSON), valid, confidence, error, model_version, schema_version
    rows.parquet                   source file, line, normalized: one row per accepted input row (the row-to-label map)
    rejects.jsonl                  source file, line, reason, raw: one row per rejected input row
    manifest.json                  model and schema versions, the input's fingerprint
    summary.json                   rows, distinct, rejected, labeled, seconds, queries/s
    label.lock                     held (flock) by the run writing the folder

A bad row (not UTF-8, a lone surrogate, a number past Python's int limit, JSON nested too deep, a CSV field past the
csv module's limit, not text, empty, too long) is a reject, never the end of the run. A shard is written to a
temporary name and renamed, so a run killed at any moment (`kill -9`) leaves only whole shards; run again, it labels
only the distinct queries no shard holds. A shard that cannot be read (torn by a copy, zero bytes) is renamed
`*.corrupt` with a warning and its queries are labeled again. A second run on a folder another run is writing stops
at once; the kernel drops the lock when its holder dies. A rerun against another model, schema or input refuses to
mix them (`--restart` starts over).
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import itertools
import json
import os
import reprlib
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from querytune.labeled import FORMATS, csv_records, jsonl_records, lone_surrogate, printable
from querytune.schema import MAX_QUERY_CHARS, normalize_text

SHARD_QUERIES = 1024  # distinct queries per shard: the most a kill can cost
LOCK = "label.lock"
BATCH_ROWS = 1 << 17  # input rows normalised at a time: memory stays flat however long the log
LABEL_COLUMNS = ["query", "normalized", "parse", "valid", "confidence", "error", "model_version", "schema_version"]


class LabelInputError(ValueError):
    """An input that cannot be read at all (missing, no supported files, no such column)."""


class Backend(Protocol):
    """What labeling needs of a model: versions, and greedy parses of a batch of texts."""

    model_version: str
    schema_version: str

    def parse(self, texts: list[str]) -> list[Any]:
        """One `Prediction`-like object per text (`parse`, `valid`, `confidence`, `error`)."""


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


def read_rows(path: str | Path, column: str = "query", where: str | None = None) -> Iterator[InputRow | tuple[InputRow, str]]:
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
                    raise LabelInputError(f"{file}: no column {col!r} in the header ({printable(', '.join(header))}); choose one with --column")
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
            return [None if v is None else v.decode("utf-8", "surrogateescape") for v in col.cast(pa.large_binary()).to_pylist()]
        return col.to_pylist()

    try:
        names = pq.read_schema(file).names
        wanted = [c for c in dict.fromkeys([column, cond]) if c in names]
        table = pq.read_table(file, columns=wanted)
        return names, values(table, column) if column in names else [], values(table, cond) if cond in names else []
    except Exception as e:  # pyarrow raises several types for a file that is not (whole) Parquet
        raise LabelInputError(f"{file}: not a readable Parquet file: {printable(str(e))}") from None


def check_query(value: Any, max_chars: int = MAX_QUERY_CHARS) -> tuple[str | None, str | None]:
    """(normalised query, None) or (None, reason).

    >>> check_query("  Cheap\\u00a0THAI  near me ")
    ('cheap thai near me', None)
    >>> check_query("   ")
    (None, 'empty query')
    >>> check_query(42)
    (None, 'not text: int')
    """
    if value is None:
        return None, "missing query"
    if not isinstance(value, str):
        return None, f"not text: {type(value).__name__}"
    bad = lone_surrogate(value)
    if bad:
        return None, bad
    norm = normalize_text(value)
    if not norm:
        return None, "empty query"
    if len(norm) > max_chars:
        return None, f"longer than {max_chars} characters ({len(norm)})"
    if any(ord(c) < 32 for c in norm):
        return None, "control characters"
    return norm, None


def fingerprint(files: list[Path]) -> str:
    """A hash of the input files' names and bytes: a rerun on changed input is noticed, a rewritten but equal
    file (`cache warm` writes its head anew each time) is not."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\n".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _write_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def labeled_queries(out: str | Path, warn: Callable[[str], None] = _warn) -> pa.Array:
    """Normalised queries the whole shards of `out/labels` already hold. A shard that cannot be read (torn by a copy
    or a full disk, zero bytes) is renamed `*.corrupt` with a one-line warning: its queries count as not labeled."""
    done = []
    for shard in sorted((Path(out) / "labels").glob("part-*.parquet")):
        try:
            done.append(pq.read_table(shard, columns=["normalized"])["normalized"].cast(pa.large_string()))
        except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...) for a damaged file
            aside = shard.with_name(shard.name + ".corrupt")
            os.replace(shard, aside)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            warn(f"warning: {shard}: unreadable label shard ({reason}); set aside as {aside.name}, its queries are labeled again")
    return pa.chunked_array(done, pa.large_string()).combine_chunks()


_HELD: set[str] = set()  # folders this process holds the lock of


@contextmanager
def lock_folder(out: str | Path) -> Iterator[None]:
    """Hold `out/label.lock` (flock, non-blocking) while a run writes `out`: a second run stops at once with a
    LabelInputError instead of labeling the same queries as the first. The kernel drops the lock when its process
    dies (`kill -9` too), so no stale lock outlives a run. Reentrant in a process: the CLI takes it before it loads
    the model, `label` again inside."""
    out = Path(out)
    key = str(out.resolve())
    if key in _HELD:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise LabelInputError(f"{out}: another run (pid {holder}) is labeling this folder; wait for it to end or use another --out") from None
    fh.truncate(0)
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        fh.close()  # closing the file drops the lock; the file stays, so no run ever locks a file another just unlinked


def by_length(queries: list[str]) -> list[str]:
    """Longest first then alphabetical: batches of similar length pad little, and the order is stable across runs."""
    return sorted(queries, key=lambda q: (-len(q), q))


@dataclass
class Accounting:
    """Every row of an input, accepted (row -> normalised query) or rejected (file, line, reason, raw)."""

    rows: int
    mapping: dict[str, list]  # source, line, normalized: one entry per accepted row
    rejects: list[dict]  # source, line, reason, raw: one per rejected row
    first_spelling: dict[str, str]  # each distinct normalised query -> its first spelling in the input


def account_rows(input_path: str | Path, column: str = "query", where: str | None = None, max_chars: int = MAX_QUERY_CHARS) -> Accounting:
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


def save_accounting(acc: Accounting, out: Path) -> None:
    """rows.parquet and rejects.jsonl of a labeling folder."""
    _write_atomic(pd.DataFrame(acc.mapping), out / "rows.parquet")
    _write_text_atomic("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in acc.rejects), out / "rejects.jsonl")


ROWS_SCHEMA = pa.schema([("source", pa.large_string()), ("line", pa.int64()), ("normalized", pa.large_string())])


def normalize_plain(text: pa.Array, max_chars: int = MAX_QUERY_CHARS) -> tuple[pa.Array, pa.Array]:
    """(`check_query`'s normalised query, the cell stripped) for each plain cell, by Arrow compute: ASCII, no control
    character, no run of spaces once the ends are trimmed, 1 to `max_chars` long. There NFKC changes nothing and
    lower case is ASCII's. Null for every other cell (missing, not ASCII, tabs, ...): `check_query` decides those.

    >>> [a.to_pylist() for a in normalize_plain(pa.array([" Cheap THAI  ", "cheap  thai", "caf\\u00e9", "a\\tb", " ", None]))]
    [['cheap thai', None, None, None, None, None], ['Cheap THAI', None, None, None, None, None]]
    """
    stripped = pc.ascii_trim(text, " ")
    length = pc.binary_length(stripped)
    plain = pc.and_(pc.and_(pc.string_is_ascii(stripped), pc.invert(pc.match_substring_regex(stripped, r"[\x00-\x1f]|  "))),
                    pc.and_(pc.greater(length, 0), pc.less_equal(length, max_chars)))
    plain = pc.fill_null(plain, False)
    return pc.if_else(plain, pc.ascii_lower(stripped), pa.scalar(None, text.type)), pc.if_else(plain, stripped, pa.scalar(None, text.type))


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
        reader = pq.ParquetFile(file, pre_buffer=False)  # pre-buffering keeps every column chunk read: memory would grow with the file
        names = reader.schema_arrow.names
    except Exception as e:
        raise unreadable(e) from None
    for col in [column] + ([cond[0]] if cond else []):
        if col not in names:
            raise LabelInputError(f"{file}: no column {col!r} (columns: {', '.join(names)})")
    batches, first = reader.iter_batches(batch_size=BATCH_ROWS, columns=list(dict.fromkeys([column] + ([cond[0]] if cond else [])))), 1
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
                keep = pc.fill_null(pc.equal(cond_bytes, pa.scalar(cond[1].encode("utf-8", "surrogateescape"), pa.large_binary())), cond[1] == "None")
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
            text = pa.array([v if type(v) is str and v.isascii() and i not in errors else None for i, v in enumerate(values)],  # isascii is O(1)
                            pa.large_string())
            yield source, pa.array([row.line for row in rows], pa.int64()), text, values.__getitem__, errors


@dataclass
class Prepared:
    """The input as labeling needs it: its counts, and each distinct normalised query with its first spelling."""

    rows: int
    accepted: int
    rejected: int
    distinct: pa.Table  # normalized, query (the first spelling, stripped): in order of first appearance


def prepare(input_path: str | Path, out: str | Path, column: str = "query", where: str | None = None, max_chars: int = MAX_QUERY_CHARS) -> Prepared:
    """Read, normalise and deduplicate the input (no model), a batch at a time, and write `out/rows.parquet` and
    `out/rejects.jsonl` (each under a temporary name, renamed when whole): what `account_rows` + `save_accounting`
    give, with memory for the distinct queries only."""
    out = Path(out)
    rows_tmp, rejects_tmp = out / ".rows.parquet.tmp", out / ".rejects.jsonl.tmp"
    counts, firsts = [0, 0], []
    try:
        with pq.ParquetWriter(rows_tmp, ROWS_SCHEMA) as rows_out, open(rejects_tmp, "w", encoding="utf-8") as rejects_out:
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
                    rejects_out.write(json.dumps({"source": source, "line": line[i].as_py(), "reason": reason, "raw": raw}, ensure_ascii=False) + "\n")
                if fixed:
                    rows, fixes, stripped = zip(*fixed)
                    mask = np.zeros(len(norm), bool)
                    mask[list(rows)] = True
                    norm = pc.replace_with_mask(norm, pa.array(mask), pa.array(fixes, pa.large_string()))
                    spelling = pc.replace_with_mask(spelling, pa.array(mask), pa.array(stripped, pa.large_string()))
                keep = pc.is_valid(norm)
                accepted = norm.filter(keep)
                rows_out.write_table(pa.table([pa.repeat(pa.scalar(source, pa.large_string()), len(accepted)), line.filter(keep), accepted], schema=ROWS_SCHEMA))
                firsts.append(first_of_each(pa.table({"normalized": accepted, "query": spelling.filter(keep)})))
                if sum(t.num_rows for t in firsts) > 2 * firsts[0].num_rows + BATCH_ROWS:  # memory: a few times the distinct queries
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
    distinct = first_of_each(pa.concat_tables([pa.table({"normalized": none, "query": none}), *firsts]))  # a query recurs across batches
    return Prepared(counts[0], counts[1], counts[0] - counts[1], distinct)


def label(input_path: str | Path, out: str | Path, backend: Backend, column: str = "query", shard_size: int = SHARD_QUERIES, where: str | None = None,
          restart: bool = False, max_chars: int = MAX_QUERY_CHARS, progress: Callable[[int, int], None] | None = None,
          stream: Callable[[list[str], int], Iterator[list[dict]]] | None = None) -> dict[str, Any]:
    """Label `input_path` into `out` (see the module doc); returns the summary. `progress(done, total)` after each
    shard. `stream(queries, shard_size)` yields label rows (`parse_rows`' shape) a shard at a time, in any order
    (default: `backend.parse` in this process; `querytune.serving.ray_engine` passes a Ray Data pipeline)."""
    t0 = time.perf_counter()
    out = Path(out)
    files = input_files(input_path)
    manifest = {"input": str(input_path), "input_fingerprint": fingerprint(files), "column": column, "where": where,
                "model_version": backend.model_version, "schema_version": backend.schema_version}
    with lock_folder(out):
        (out / "labels").mkdir(parents=True, exist_ok=True)
        old = out / "manifest.json"
        if old.exists() and not restart:
            try:
                before = json.loads(old.read_text(encoding="utf-8"))
            except ValueError:
                raise LabelInputError(f"{old}: not readable; use --restart to start over") from None
            changed = [k for k in manifest if before.get(k) != manifest[k]]
            if changed:
                raise LabelInputError(f"{out} holds labels of another run ({', '.join(f'{k}: {before.get(k)} -> {manifest[k]}' for k in changed)}); "
                                      "use another --out or --restart to start over")
        if restart:
            for shard in (out / "labels").glob("part-*.parquet"):
                shard.unlink()
        _write_text_atomic(json.dumps(manifest, indent=2) + "\n", old)

        prep = prepare(input_path, out, column, where, max_chars)
        todo_table = prep.distinct.filter(pc.invert(pc.is_in(prep.distinct["normalized"], value_set=labeled_queries(out))))
        first_spelling = dict(zip(todo_table["normalized"].to_pylist(), todo_table["query"].to_pylist()))
        todo = by_length(list(first_spelling))
        resumed = prep.distinct.num_rows - len(todo)
        # numbers of set-aside shards too: a new shard never takes the name of one kept for inspection
        next_shard = max((int(p.name.split(".")[0].split("-")[1]) + 1 for p in (out / "labels").glob("part-*")), default=0)
        stream = stream or (lambda queries, size: (parse_rows(backend, queries[i:i + size]) for i in range(0, len(queries), size)))
        t_label = time.perf_counter()
        if progress:
            progress(resumed, prep.distinct.num_rows)
        written = 0
        for labels in stream(todo, shard_size) if todo else []:
            for rec in labels:
                rec["query"] = first_spelling[rec["normalized"]]
            _write_atomic(pd.DataFrame(labels, columns=LABEL_COLUMNS), out / "labels" / f"part-{next_shard:05d}.parquet")
            next_shard += 1
            written += len(labels)
            if progress:
                progress(resumed + written, prep.distinct.num_rows)
        label_seconds = time.perf_counter() - t_label
        labels_df = read_labels(out)
        summary = {"rows": prep.rows, "accepted": prep.accepted, "rejected": prep.rejected, "distinct": prep.distinct.num_rows,
                   "labeled_now": len(todo), "resumed": resumed, "invalid": int((~labels_df["valid"]).sum()),
                   "seconds": round(time.perf_counter() - t0, 2), "label_seconds": round(label_seconds, 2),
                   "queries_per_s": round(len(todo) / label_seconds, 2) if todo and label_seconds else None,
                   "rows_per_s": round(prep.rows / (time.perf_counter() - t0), 2), **manifest}
        _write_text_atomic(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    return summary


def parse_rows(backend: Backend, queries: list[str]) -> list[dict]:
    """Label rows (without `query`) for normalised queries, through `backend.parse`."""
    preds = backend.parse(queries)
    return [{"normalized": q, "parse": json.dumps(p.parse, ensure_ascii=False, sort_keys=True) if p.parse else None,
             "valid": bool(p.valid), "confidence": float(p.confidence), "error": p.error,
             "model_version": backend.model_version, "schema_version": backend.schema_version} for q, p in zip(queries, preds)]


def read_labels(out: str | Path) -> pd.DataFrame:
    """Every label of a labeling folder, one row per distinct normalised query."""
    shards = sorted((Path(out) / "labels").glob("part-*.parquet"))
    if not shards:
        return pd.DataFrame(columns=LABEL_COLUMNS)
    labels = pd.concat([pd.read_parquet(s) for s in shards], ignore_index=True)
    # a shard whose rows all parsed stores `error` as a null column, one with a failure as text: missing is None in both
    labels["error"] = labels["error"].astype(object).where(labels["error"].notna(), None)
    return labels


def labeled_rows(out: str | Path) -> pd.DataFrame:
    """One row per accepted input row (source, line, normalized) with its label joined on."""
    out = Path(out)
    return pd.read_parquet(out / "rows.parquet").merge(read_labels(out), on="normalized", how="left", validate="many_to_one")
