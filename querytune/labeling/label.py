"""Offline batch labeling: a query log in, one parse per distinct normalised query out, every row accounted for.

    querytune label logs/ --model runs/sft --out runs/labels [--column query] [--backend transformers|vllm]

read (CSV / JSONL / Parquet, a file or a folder of them) -> normalise (NFKC, case, whitespace) -> reject what
cannot be a query (line and reason in `rejects.jsonl`) -> deduplicate -> label each distinct query once, in
batches of similar length -> Parquet shards. Reading, normalising and deduplicating (`prepare`) run on Arrow arrays a
batch at a time, so memory follows the distinct queries, not the rows: plain ASCII cells are normalised by Arrow
compute, the rare others by `check_query`, the per-row definition (`account_rows` applies it row by row;
tests/test_label_scale.py holds the two equal). The output folder holds:

    labels/part-00000.parquet ...  query, normalized, parse (JSON), valid, confidence, error, model_version,
                                   schema_version
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

import fcntl
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from querytune.labeling.log_input import Accounting, LabelInputError, input_files
from querytune.labeling.log_prepare import prepare
from querytune.query import MAX_QUERY_CHARS

SHARD_QUERIES = 1024  # distinct queries per shard: the most a kill can cost
LOCK = "label.lock"
LABEL_COLUMNS = ["query", "normalized", "parse", "valid", "confidence", "error", "model_version", "schema_version"]


class Backend(Protocol):
    """What labeling needs of a model: versions, and greedy parses of a batch of texts."""

    model_version: str
    schema_version: str

    def parse(self, texts: list[str]) -> list[Any]:
        """One `Prediction`-like object per text (`parse`, `valid`, `confidence`, `error`)."""


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
    tmp.unlink(missing_ok=True)  # a link left there is removed, never written through
    df.to_parquet(tmp, index=False)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
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
            warn(
                f"warning: {shard}: unreadable label shard ({reason}); set aside as {aside.name}, "
                "its queries are labeled again"
            )
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
    check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise LabelInputError(
            f"{out}: another run (pid {holder}) is labeling this folder; wait for it to end or use another --out"
        ) from None
    fh.truncate(0)
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        fh.close()  # closing the file drops the lock; the file stays, so no run ever locks a file another just unlinked


OWN = ("labels", "manifest.json", "summary.json", "rows.parquet", "rejects.jsonl", LOCK)  # what a run writes in `out`


def check_out_folder(out: Path) -> None:
    """A labeling folder a run may write: `out` a folder (or not there yet), and nothing it writes inside a link or
    of the wrong kind, so that no file outside `out` is ever written or deleted (`--restart` deletes shards)."""
    if out.exists() and not out.is_dir():
        raise LabelInputError(f"--out {out}: exists and is not a folder")
    for name in OWN:
        path = out / name
        if path.is_symlink():
            raise LabelInputError(f"{path}: a symbolic link; a labeling folder writes only inside itself (remove it)")
        if path.exists() and (path.is_dir() != (name == "labels")):
            kind = "a folder" if path.is_dir() else "a file"
            raise LabelInputError(
                f"{path}: is {kind}, where a run writes its {'labels folder' if name == 'labels' else 'file'}"
            )


def rebuilt_manifest(out: Path, manifest: dict, warn: Callable[[str], None]) -> None:
    """`out/manifest.json` cannot be read (torn by a crash or a copy): the shards say which model and schema labeled
    them. Theirs are this run's: the manifest is written anew and every intact label is kept. Any other: refused."""
    versions = set()
    for shard in sorted((out / "labels").glob("part-*.parquet")):
        try:
            table = pq.read_table(shard, columns=["model_version", "schema_version"])
        except Exception:  # noqa: BLE001 - a torn shard is set aside later (`labeled_queries`)
            continue
        versions |= set(zip(table["model_version"].to_pylist(), table["schema_version"].to_pylist()))
    others = versions - {(manifest["model_version"], manifest["schema_version"])}
    if others:
        found = ", ".join(f"model {m} schema {s}" for m, s in sorted(others))
        raise LabelInputError(
            f"{out / 'manifest.json'}: not readable, and the shards hold labels of another run ({found}); "
            "use another --out or --restart to start over"
        )
    warn(f"warning: {out / 'manifest.json'}: not readable; rebuilt from the shards' model and schema versions")


def by_length(queries: list[str]) -> list[str]:
    """Longest first then alphabetical: batches of similar length pad little, and the order is stable across runs."""
    return sorted(queries, key=lambda q: (-len(q), q))


def save_accounting(acc: Accounting, out: Path) -> None:
    """rows.parquet and rejects.jsonl of a labeling folder."""
    _write_atomic(pd.DataFrame(acc.mapping), out / "rows.parquet")
    _write_text_atomic("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in acc.rejects), out / "rejects.jsonl")


def label(
    input_path: str | Path,
    out: str | Path,
    backend: Backend,
    column: str = "query",
    shard_size: int = SHARD_QUERIES,
    where: str | None = None,
    restart: bool = False,
    max_chars: int = MAX_QUERY_CHARS,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] = _warn,
    stream: Callable[[list[str], int], Iterator[list[dict]]] | None = None,
) -> dict[str, Any]:
    """Label `input_path` into `out` (see the module doc); returns the summary. `progress(done, total)` after each
    shard. `stream(queries, shard_size)` yields label rows (`parse_rows`' shape) a shard at a time, in any order
    (default: `backend.parse` in this process; `querytune.labeling.ray_engine` passes a Ray Data pipeline)."""
    t0 = time.perf_counter()
    out = Path(out)
    files = input_files(input_path)
    manifest = {
        "input": str(input_path),
        "input_fingerprint": fingerprint(files),
        "column": column,
        "where": where,
        "model_version": backend.model_version,
        "schema_version": backend.schema_version,
    }
    with lock_folder(out):
        (out / "labels").mkdir(parents=True, exist_ok=True)
        old = out / "manifest.json"
        if old.exists() and not restart:
            try:
                before = json.loads(old.read_text(encoding="utf-8"))
                if not isinstance(before, dict):
                    raise ValueError("not an object")
            except ValueError:  # UnicodeDecodeError too
                rebuilt_manifest(out, manifest, warn)
                before = manifest
            changed = [k for k in manifest if before.get(k) != manifest[k]]
            if changed:
                diff = ", ".join(f"{k}: {before.get(k)} -> {manifest[k]}" for k in changed)
                raise LabelInputError(
                    f"{out} holds labels of another run ({diff}); use another --out or --restart to start over"
                )
        if restart:  # check_out_folder has refused a linked labels folder: these are all inside `out`
            for shard in (out / "labels").glob("part-*.parquet"):
                shard.unlink()
        _write_text_atomic(json.dumps(manifest, indent=2) + "\n", old)

        prep = prepare(input_path, out, column, where, max_chars)
        todo_table = prep.distinct.filter(
            pc.invert(pc.is_in(prep.distinct["normalized"], value_set=labeled_queries(out, warn)))
        )
        first_spelling = dict(zip(todo_table["normalized"].to_pylist(), todo_table["query"].to_pylist()))
        todo = by_length(list(first_spelling))
        resumed = prep.distinct.num_rows - len(todo)
        # numbers of set-aside shards too: a new shard never takes the name of one kept for inspection
        next_shard = max(
            (int(p.name.split(".")[0].split("-")[1]) + 1 for p in (out / "labels").glob("part-*")), default=0
        )
        stream = stream or (
            lambda queries, size: (parse_rows(backend, queries[i : i + size]) for i in range(0, len(queries), size))
        )
        t_label = time.perf_counter()
        if progress:
            progress(resumed, prep.distinct.num_rows)
        written = 0
        for labels in stream(todo, shard_size) if todo else []:
            for rec in labels:
                rec["query"] = first_spelling[rec["normalized"]]
            _write_atomic(
                pd.DataFrame(labels, columns=LABEL_COLUMNS), out / "labels" / f"part-{next_shard:05d}.parquet"
            )
            next_shard += 1
            written += len(labels)
            if progress:
                progress(resumed + written, prep.distinct.num_rows)
        label_seconds = time.perf_counter() - t_label
        labels_df = read_labels(out)
        summary = {
            "rows": prep.rows,
            "accepted": prep.accepted,
            "rejected": prep.rejected,
            "distinct": prep.distinct.num_rows,
            "labeled_now": len(todo),
            "resumed": resumed,
            "invalid": int((~labels_df["valid"]).sum()),
            "seconds": round(time.perf_counter() - t0, 2),
            "label_seconds": round(label_seconds, 2),
            "queries_per_s": round(len(todo) / label_seconds, 2) if todo and label_seconds else None,
            "rows_per_s": round(prep.rows / (time.perf_counter() - t0), 2),
            **manifest,
        }
        _write_text_atomic(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    return summary


def parse_rows(backend: Backend, queries: list[str]) -> list[dict]:
    """Label rows (without `query`) for normalised queries, through `backend.parse`."""
    preds = backend.parse(queries)
    return [
        {
            "normalized": q,
            "parse": json.dumps(p.parse, ensure_ascii=False, sort_keys=True) if p.parse else None,
            "valid": bool(p.valid),
            "confidence": float(p.confidence),
            "error": p.error,
            "model_version": backend.model_version,
            "schema_version": backend.schema_version,
        }
        for q, p in zip(queries, preds)
    ]


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
    return pd.read_parquet(out / "rows.parquet").merge(
        read_labels(out), on="normalized", how="left", validate="many_to_one"
    )
