"""Offline batch labeling: a query log in, one parse per distinct normalised query out, every row accounted for.

    querytune label logs/ --model runs/sft --out runs/labels [--column query] [--backend transformers|vllm]

read (CSV / JSONL / Parquet, a file or a folder of them) -> normalise (NFKC, case, whitespace) -> reject what
cannot be a query (line and reason in `rejects.jsonl`) -> deduplicate -> label each distinct query once, in
batches of similar length -> Parquet shards. The output folder holds:

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
import json
import os
import reprlib
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import pandas as pd

from querytune.labeled import FORMATS, csv_records, jsonl_records, lone_surrogate, printable
from querytune.schema import normalize_text

MAX_QUERY_CHARS = 256  # longer "queries" are pasted documents, not search-box input
SHARD_QUERIES = 1024  # distinct queries per shard: the most a kill can cost
LOCK = "label.lock"
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
    import pyarrow as pa
    import pyarrow.parquet as pq

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


def labeled_queries(out: str | Path, warn: Callable[[str], None] = _warn) -> set[str]:
    """Normalised queries the whole shards of `out/labels` already hold. A shard that cannot be read (torn by a copy
    or a full disk, zero bytes) is renamed `*.corrupt` with a one-line warning: its queries count as not labeled."""
    done: set[str] = set()
    for shard in sorted((Path(out) / "labels").glob("part-*.parquet")):
        try:
            done.update(pd.read_parquet(shard, columns=["normalized"])["normalized"])
        except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...) for a damaged file
            aside = shard.with_name(shard.name + ".corrupt")
            os.replace(shard, aside)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            warn(f"warning: {shard}: unreadable label shard ({reason}); set aside as {aside.name}, its queries are labeled again")
    return done


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
    """Read and normalise every row of the input (no model): what `label` writes as rows.parquet and rejects.jsonl."""
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


def label(input_path: str | Path, out: str | Path, backend: Backend, column: str = "query", shard_size: int = SHARD_QUERIES, where: str | None = None,
          restart: bool = False, max_chars: int = MAX_QUERY_CHARS, progress: Callable[[int, int], None] | None = None,
          stream: Callable[[list[str], int], Iterator[list[dict]]] | None = None) -> dict[str, Any]:
    """Label `input_path` into `out` (see the module doc); returns the summary. `progress(done, total)` after each
    shard. `stream(queries, shard_size)` yields label rows (`parse_rows`' shape) a shard at a time, in any order
    (default: `backend.parse` in this process; `querytune.ray_engine` passes a Ray Data pipeline)."""
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

        acc = account_rows(input_path, column, where, max_chars)
        save_accounting(acc, out)
        first_spelling = acc.first_spelling

        done = labeled_queries(out)
        todo = by_length([q for q in first_spelling if q not in done])
        resumed = len(first_spelling) - len(todo)
        # numbers of set-aside shards too: a new shard never takes the name of one kept for inspection
        next_shard = max((int(p.name.split(".")[0].split("-")[1]) + 1 for p in (out / "labels").glob("part-*")), default=0)
        stream = stream or (lambda queries, size: (parse_rows(backend, queries[i:i + size]) for i in range(0, len(queries), size)))
        t_label = time.perf_counter()
        if progress:
            progress(resumed, len(first_spelling))
        written = 0
        for labels in stream(todo, shard_size) if todo else []:
            for rec in labels:
                rec["query"] = first_spelling[rec["normalized"]]
            _write_atomic(pd.DataFrame(labels, columns=LABEL_COLUMNS), out / "labels" / f"part-{next_shard:05d}.parquet")
            next_shard += 1
            written += len(labels)
            if progress:
                progress(resumed + written, len(first_spelling))
        label_seconds = time.perf_counter() - t_label
        labels_df = read_labels(out)
        summary = {"rows": acc.rows, "accepted": len(acc.mapping["normalized"]), "rejected": len(acc.rejects), "distinct": len(first_spelling),
                   "labeled_now": len(todo), "resumed": resumed, "invalid": int((~labels_df["valid"]).sum()),
                   "seconds": round(time.perf_counter() - t0, 2), "label_seconds": round(label_seconds, 2),
                   "queries_per_s": round(len(todo) / label_seconds, 2) if todo and label_seconds else None,
                   "rows_per_s": round(acc.rows / (time.perf_counter() - t0), 2), **manifest}
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
    return pd.concat([pd.read_parquet(s) for s in shards], ignore_index=True)


def labeled_rows(out: str | Path) -> pd.DataFrame:
    """One row per accepted input row (source, line, normalized) with its label joined on."""
    out = Path(out)
    return pd.read_parquet(out / "rows.parquet").merge(read_labels(out), on="normalized", how="left", validate="many_to_one")
