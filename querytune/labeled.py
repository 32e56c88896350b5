"""Labeled-data import: JSONL, CSV or Parquet rows of ``text``, ``intent``, ``slots``, checked against a schema.

Each row is validated and canonicalised with ``Schema.parse``; a row that does not fit becomes a
``Reject`` naming its line (JSONL, CSV: the physical line in the file, header = line 1) or row
(Parquet, 1-based) and the reason. Columns besides ``id``/``text``/``intent``/``slots`` are kept as
``extra``. In CSV (and Parquet string columns) ``slots`` is a JSON object string; an empty cell is ``{}``.

    querytune data validate labels.jsonl [--schema data/schema.yaml] [--rejects rejects.jsonl]
"""

from __future__ import annotations

import csv
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from querytune.query import lone_surrogate
from querytune.schema import Parse, ParseError, Schema

REQUIRED = ("text", "intent", "slots")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class LabeledDataError(ValueError):
    """A labeled file that cannot be read at all (missing, empty, wrong format, missing column)."""


@dataclass(frozen=True)
class LabeledRow:
    id: str
    text: str
    intent: str
    slots: dict[str, Any]  # canonical values, as Schema.parse returns them
    extra: dict[str, Any] = field(default_factory=dict)
    line: int = 0  # line (JSONL, CSV) or row (Parquet) in the source file

    @property
    def parse(self) -> Parse:
        return Parse(self.intent, self.slots)


@dataclass(frozen=True)
class Reject:
    line: int  # 1-based line in the file (JSONL, CSV) or 1-based row (Parquet, see unit)
    reason: str
    raw: Any  # the line's text (JSONL) or the row's cells as a dict (CSV, Parquet)
    unit: str = "line"

    @property
    def where(self) -> str:
        """``12`` for a line, ``row 12`` for a Parquet row: what follows ``FILE:`` in messages."""
        return str(self.line) if self.unit == "line" else f"{self.unit} {self.line}"


def json_loads(text: str) -> tuple[Any, str | None]:
    """(value, None) or (None, why `text` is not JSON Python can hold): the errors of one line, never the file's.

    >>> json_loads('{"n": ' + '9' * 5000 + '}')[1]
    'not valid JSON: a number with more than 4300 digits'
    """
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"not valid JSON: {e.msg} at char {e.pos}"
    except ValueError:  # the only other one: an int past sys.get_int_max_str_digits()
        return None, f"not valid JSON: a number with more than {sys.get_int_max_str_digits()} digits"
    except RecursionError:
        return None, "not valid JSON: nested too deeply"


def printable(text: str) -> str:
    """`text` that UTF-8 can hold: a byte read with errors="surrogateescape" shows as `\\xe9`, any other lone
    surrogate as `\\ud800`, so a reject's raw text says what was wrong with it.

    >>> printable("caf\\udce9"), printable("\\ud800 tacos")
    ('caf\\\\xe9', '\\\\ud800 tacos')
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


MAX_LINE_CHARS = 1 << 20  # a longer line is a bad line, read past in pieces: memory never holds it whole
EXCERPT_CHARS = 200  # what a reject keeps of a bad line


def bounded_lines(f, overlong: dict[int, str]) -> Iterator[str]:
    """The lines of text file `f`, but a line over `MAX_LINE_CHARS` characters is read past in pieces and given as
    an empty line, its number and first characters put in `overlong` (a 1 GB line costs the memory of the limit, not
    of 1 GB)."""
    limit = MAX_LINE_CHARS
    for n in itertools.count(1):
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith("\n"):
            excerpt, size = line[:EXCERPT_CHARS], len(line)
            while (piece := f.readline(1 << 20)) and not piece.endswith("\n"):
                size += len(piece)
            size += len(piece)
            overlong[n] = f"{excerpt}... ({size:,} characters)"
            line = "\n"
        yield line


def too_long() -> str:
    return f"line longer than {MAX_LINE_CHARS:,} characters"


def jsonl_records(path: Path, errors: str = "strict") -> Iterator[tuple[int, Any, str | None]]:
    """(line, record or raw text, error) for each non-blank line. `errors="surrogateescape"` makes a line that is not
    UTF-8 a bad line instead of a bad file; a line over `MAX_LINE_CHARS` is a bad line with an excerpt."""
    overlong: dict[int, str] = {}
    with path.open(encoding="utf-8-sig", errors=errors) as f:
        for n, line in enumerate(bounded_lines(f, overlong), 1):
            if n in overlong:
                yield n, overlong.pop(n), too_long()
                continue
            if not line.strip():
                continue
            raw = line.rstrip("\r\n")
            rec, error = json_loads(line)
            error = error or lone_surrogate(rec)
            yield (n, raw, error) if error else (n, rec, None)


def csv_records(path: Path, errors: str = "strict") -> tuple[list[str], list[tuple[int, Any, str | None]]]:
    """Header and (first physical line, cells by column, error) for each non-blank row. A row the csv module cannot
    read (a field past its size limit) is a bad row. With `errors="surrogateescape"` a byte that is not UTF-8 becomes
    a lone surrogate in its cell (see `lone_surrogate`) instead of failing the file."""
    out, overlong = [], {}
    with path.open(encoding="utf-8-sig", newline="", errors=errors) as f:
        reader = csv.reader(bounded_lines(f, overlong))
        header = next(reader, None) or []
        if 1 in overlong:
            raise csv.Error(f"the header is a {too_long()}")
        end = reader.line_num
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # the reader goes on with the next line
                start, end = end + 1, reader.line_num
                out.append((start, None, f"not readable as CSV: {e}"))
                continue
            start, end = end + 1, reader.line_num  # a quoted field may span several lines
            for n in [n for n in overlong if n <= end]:
                out.append((n, overlong.pop(n), too_long()))
            if not cells:
                continue
            if len(cells) != len(header):
                raw = dict(zip(header, cells)) if len(cells) < len(header) else cells
                out.append((start, raw, f"{len(cells)} fields, the header has {len(header)}"))
            else:
                out.append((start, dict(zip(header, cells)), None))
    return header, out


def _parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    import pyarrow.parquet as pq  # only Parquet input needs pyarrow

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise LabeledDataError(f"{path}: not a readable Parquet file: {e}") from None
    return table.column_names, table.to_pylist()


def _row(rec: Any, line: int, stem: str, schema: Schema, slots_as_json: bool) -> LabeledRow:
    """One record -> LabeledRow, or ParseError with the reason."""
    if not isinstance(rec, dict):
        raise ParseError(f"expected an object, got {type(rec).__name__}")
    bad = lone_surrogate(rec)  # a Parquet cell or decoded slots JSON: no output file could hold it
    if bad:
        raise ParseError(bad)
    text = rec.get("text")
    if text is None or (isinstance(text, str) and not text.strip()):
        raise ParseError("text: missing or empty")
    if not isinstance(text, str):
        raise ParseError(f"text: expected a string, got {text!r}")
    slots = rec.get("slots")
    if slots_as_json and isinstance(slots, str):
        slots, error = json_loads(slots) if slots.strip() else ({}, None)
        if error:
            raise ParseError(f"slots: {error}")
    if slots is not None and not isinstance(slots, dict):
        raise ParseError(f"slots: expected an object, got {type(slots).__name__}")
    parse = schema.parse({"intent": rec.get("intent"), "slots": slots or {}})
    id_ = rec.get("id")
    extra = {k: v for k, v in rec.items() if k not in ("id", *REQUIRED)}
    return LabeledRow(
        str(id_) if id_ not in (None, "") else f"{stem}:{line}", text, parse.intent, parse.slots, extra, line
    )


def read_records(
    path: str | Path, required: tuple[str, ...] = REQUIRED
) -> tuple[str, str, list[tuple[int, Any, str | None]]]:
    """A JSONL, CSV or Parquet file as (kind, unit, [(line or row, record, error)]): the one reader of every user
    file with rows (labels, search logs, catalogues). A file that cannot be read at all, or lacks a `required`
    column, is a LabeledDataError naming it."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise LabeledDataError(f"{path}: unknown format {path.suffix!r} (expected {', '.join(FORMATS)})")
    if not path.is_file():
        raise LabeledDataError(f"{path}: file not found")
    unit, columns = "line", None
    try:
        if kind == "jsonl":
            records = list(jsonl_records(path))
            objects = [r for _, r, err in records if err is None and isinstance(r, dict)]
            columns = {k for r in objects for k in r} if objects else None
        elif kind == "csv":
            header, records = csv_records(path)
            columns = set(header)
        else:
            header, table = _parquet(path)
            records, columns, unit = [(n, r, None) for n, r in enumerate(table, 1)], set(header), "row"
    except UnicodeDecodeError as e:
        raise LabeledDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise LabeledDataError(f"{path}: not readable as CSV: {e}") from None
    if not records:
        raise LabeledDataError(f"{path}: no rows")
    missing = [c for c in required if columns is not None and c not in columns]
    if missing:
        raise LabeledDataError(f"{path}: missing required column(s) {', '.join(missing)} (need {', '.join(required)})")
    return kind, unit, records


def load_labeled(path: str | Path, schema: Schema) -> tuple[list[LabeledRow], list[Reject]]:
    """Read a labeled file; return the rows that fit the schema and the rejects, in file order."""
    path = Path(path)
    kind, unit, records = read_records(path)
    ok: list[LabeledRow] = []
    rejects: list[Reject] = []
    seen: dict[str, int] = {}
    for n, rec, err in records:
        try:
            if err:
                raise ParseError(err)
            row = _row(rec, n, path.stem, schema, slots_as_json=kind != "jsonl")
            if row.id in seen:
                raise ParseError(f"id: {row.id!r} already used at {unit} {seen[row.id]}")
        except ParseError as e:
            rejects.append(Reject(n, str(e), rec, unit))
            continue
        seen[row.id] = n
        ok.append(row)
    return ok, rejects


def schema_hint(rejects: list[Reject], schema_given: bool) -> str | None:
    """A hint when labels name intents or slots the default schema lacks and no `--schema` was given: the likely
    cause is a forgotten `--schema`, not bad labels (a bad value of a known slot gets no hint).

    >>> schema_hint([Reject(3, "intent: 'play_song' is not an intent of schema 'local' (one of: ...)", {})], False)
    'hint: the labels do not fit the default schema (data/schema.yaml): give yours with --schema FILE'
    """
    unknown = ("is not an intent of schema", ": not a slot of schema")
    if schema_given or not any(u in r.reason for r in rejects for u in unknown):
        return None
    return "hint: the labels do not fit the default schema (data/schema.yaml): give yours with --schema FILE"


def write_rejects(rejects: list[Reject], path: str | Path) -> None:
    """One JSON object per reject: ``{"line", "reason", "raw"}`` (``line`` is the row for Parquet)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rejects:
            f.write(
                json.dumps({"line": r.line, "reason": r.reason, "raw": r.raw}, ensure_ascii=False, default=str) + "\n"
            )


def in_train_split(row_id: str, train_share: float = 0.8) -> bool:
    """A split fixed by id: the same id always lands on the same side, whatever the file order.

    >>> in_train_split("sgd:train:100_00000:t0:Events_1")
    True
    """
    import hashlib

    return int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < train_share


def write_labeled(rows: list[LabeledRow], path: str | Path) -> None:
    """JSONL with id, text, intent, slots and the extra columns."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(
                json.dumps(
                    {"id": r.id, "text": r.text, "intent": r.intent, "slots": r.slots, **r.extra}, ensure_ascii=False
                )
                + "\n"
            )


def seed_rows(world: str | Path) -> list[dict]:
    """The rows of a world folder's seed.jsonl as written (text, intent, slots), unvalidated; [] where the folder has
    none (a user's own world may label no seed). What the bucket and the next round call the texts the labels taught
    (training validates the same file against its schema: `load_labeled`)."""
    path = Path(world) / "seed.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
