"""`querytune cache`: load labels into the parse cache, inspect it, warm it with a new model, promote, roll back.

querytune cache load runs/labels --cache sqlite:///runs/cache.db
querytune cache stats --cache sqlite:///runs/cache.db
querytune cache warm runs/world/log.parquet --model runs/dpo --cache sqlite:///runs/cache.db --share 0.5
querytune cache promote --model runs/dpo --cache sqlite:///runs/cache.db
querytune cache rollback --cache sqlite:///runs/cache.db
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from querytune.cli.common import Backend, UserError, prepare_out, user_errors

app = typer.Typer(help="The parse cache (SQLite or Redis): load, stats, warm, promote, rollback.", no_args_is_help=True)

CACHE_HELP = "Cache URL: sqlite:///path.db (embedded, WAL) or redis://host:port/db (shared by replicas)."


@app.callback()
def _group() -> None:
    """The parse cache (SQLite or Redis): load, stats, warm, promote, rollback."""


def _open(url: str, create: bool = False):
    """The cache at `url`, reached now so a wrong URL fails here with its name; only `load` and `warm` create a
    SQLite file (a misspelled path in `stats` must not report an empty new cache)."""
    from querytune.serving.cache import CacheUnavailable, open_cache

    try:
        cache = open_cache(url, create=create)
        cache.active()
        return cache
    except CacheUnavailable as e:
        raise UserError(f"--cache {e}") from e


@app.command()
def load(
    labels: Path = typer.Argument(
        ..., help="Labeling folder written by `querytune label` (its labels/part-*.parquet)."
    ),
    cache: str = typer.Option(..., "--cache", envvar="QUERYTUNE_CACHE_URL", help=CACHE_HELP),
    include_invalid: bool = typer.Option(
        False, "--include-invalid", help="Also cache labels the schema rejected (default: only valid parses)."
    ),
) -> None:
    """Put every label of a labeling folder into the cache, keyed by normalised query, schema and model version."""

    with user_errors():
        if not labels.is_dir():
            raise UserError(f"{labels}: folder not found")
        typer.echo(json.dumps(load_labels(_open(cache, create=True), labels, only_valid=not include_invalid)))


@app.command()
def stats(cache: str = typer.Option(..., "--cache", envvar="QUERYTUNE_CACHE_URL", help=CACHE_HELP)) -> None:
    """Entries per schema and model version, size, and the active (served) model."""
    with user_errors():
        typer.echo(json.dumps(_open(cache).stats(), indent=2))


def head_queries(
    log: Path, column: str, share: float, top: int | None, where: str | None = None
) -> tuple[list[str], float]:
    """The distinct normalised queries that carry `share` of the log's rows (most typed first), at most `top`;
    and the share of rows they carry."""
    from collections import Counter

    from querytune.labeling.log_input import read_rows
    from querytune.query import check_query

    counts: Counter[str] = Counter()
    for item in read_rows(log, column, where):
        if isinstance(item, tuple):
            continue
        norm, _ = check_query(item.text)
        if norm:
            counts[norm] += 1
    total, covered, head = sum(counts.values()), 0, []
    for q, n in counts.most_common():
        if covered >= share * total or (top is not None and len(head) >= top):
            break
        head.append(q)
        covered += n
    return head, covered / total if total else 0.0


@app.command()
def warm(
    log: Path = typer.Argument(..., help="Query log (CSV, JSONL, Parquet file or folder) whose head to label."),
    model: Path = typer.Option(..., "--model", help="The model about to be promoted."),
    cache: str = typer.Option(..., "--cache", envvar="QUERYTUNE_CACHE_URL", help=CACHE_HELP),
    share: float = typer.Option(
        0.5,
        "--share",
        min=0.0,
        max=1.0,
        help="Label the most typed queries until they carry this share of the log's rows.",
    ),
    top: int = typer.Option(None, "--top", min=1, help="At most this many distinct queries."),
    column: str = typer.Option("query", "--column", help="Column or field holding the query text."),
    where: str = typer.Option(None, "--where", help="Only rows whose COLUMN holds VALUE, e.g. period=early."),
    work: Path = typer.Option(
        None, "--work", help="Labeling folder for the head (default: a new folder under the system temp dir)."
    ),
    backend: Backend = typer.Option("transformers", "--backend", help="transformers or vllm."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace a --work folder that is not empty: its contents are removed first (default: refuse it).",
    ),
) -> None:
    """Label the head of a log with a new model and load it, before `promote`, so a promotion serves hits at once."""
    import tempfile

    import pandas as pd

    from querytune.labeling.label import label as run_label
    from querytune.runtime.backends import load_backend

    with user_errors():
        target = _open(cache, create=True)
        head, carried = head_queries(log, column, share, top, where)
        if not head:
            raise UserError(f"{log}: no usable queries in column {column!r}")
        if work:
            prepare_out(work, force, inputs=[log, model], option="--work")
        work = work or Path(tempfile.mkdtemp(prefix="querytune-warm-"))
        work.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"query": head}).to_parquet(work / "head.parquet")
        summary = run_label(work / "head.parquet", work / "labels", load_backend(backend, model))
        loaded = load_labels(target, work / "labels")
        typer.echo(
            json.dumps(
                {
                    "head_queries": len(head),
                    "log_share": round(carried, 4),
                    "labeled_now": summary["labeled_now"],
                    "model_version": summary["model_version"],
                    **loaded,
                }
            )
        )


@app.command()
def promote(
    model: Path = typer.Option(..., "--model", help="Model folder to serve from now on."),
    cache: str = typer.Option(..., "--cache", envvar="QUERYTUNE_CACHE_URL", help=CACHE_HELP),
    force: bool = typer.Option(
        False, "--force", help="Promote even when the cache holds no entry of this model (every request would miss)."
    ),
    offpolicy_log: Path = typer.Option(
        None,
        "--offpolicy-log",
        help="A log with an exploration bucket: promote only if this model's off-policy click estimate on it "
        "(`querytune eval offpolicy`) beats the active model's, on the same requests.",
    ),
) -> None:
    """Make a model the active one: servers started with `--model active` serve it and its cache entries."""
    from querytune.runtime.model import ModelFolder

    with user_errors():
        target = _open(cache)
        folder = ModelFolder.open(model)
        schema, version = folder.schema, folder.version
        warm_entries = sum(v["entries"] for v in target.stats()["versions"] if v["model_version"] == version)
        if not warm_entries and not force:
            raise UserError(
                f"the cache holds no entry of {model} (version {version}): run `querytune cache warm` first, or --force"
            )
        checked = _offpolicy_gate(offpolicy_log, target.active(), model) if offpolicy_log else {}
        record = target.promote(version, str(model.resolve()), schema.version)
        typer.echo(json.dumps(record | {"warm_entries": warm_entries} | checked))


def _offpolicy_gate(log: Path, active: dict[str, Any] | None, model: Path) -> dict[str, Any]:
    """The off-policy check of `promote --offpolicy-log`: the candidate against the active model on the bucket's
    requests; a candidate that does not beat it is refused with both estimates."""
    from querytune.evaluation.offpolicy import estimate, model_parses, read_bucket
    from querytune.runtime.backends import load_backend

    if not active:
        raise UserError("--offpolicy-log: the cache has no active model to beat (promote one without the check first)")
    bucket = read_bucket(log)
    parses = {
        name: model_parses(load_backend("transformers", path), bucket)
        for name, path in (("active", Path(active["model_dir"])), ("candidate", model))
    }
    result = estimate(bucket, parses)
    a, c = result["models"]["active"], result["models"]["candidate"]
    d = c["vs_first"]
    said = (
        f"off-policy ctr on {result['requests']:,} bucket requests: candidate {c['estimate']:.4f} (support "
        f"{c['support']:.2f}), active {a['estimate']:.4f} (support {a['support']:.2f}); difference "
        f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
    )
    if d["difference"] <= 0:
        raise UserError(f"not promoted: {model} does not beat the active model: {said}")
    typer.echo(said, err=True)
    return {"offpolicy": {"log": str(log), "difference": d, "candidate": c, "active": a}}


@app.command()
def rollback(cache: str = typer.Option(..., "--cache", envvar="QUERYTUNE_CACHE_URL", help=CACHE_HELP)) -> None:
    """Return to the model that was active before the last promotion."""
    with user_errors():
        typer.echo(json.dumps(_open(cache).rollback()))


def load_labels(cache, labels_dir: str | Path, only_valid: bool = True) -> dict[str, Any]:
    """Put a labeling folder's labels (`querytune label`) into the cache; returns counts."""
    from querytune.labeling.label import read_labels
    from querytune.serving.cache import Entry

    labels = read_labels(labels_dir)
    if labels.empty:
        raise ValueError(f"{labels_dir}: no labels (run `querytune label` first)")
    kept = labels[labels["valid"]] if only_valid else labels
    by_schema: dict[str, list] = {}
    for r in kept.itertuples():
        by_schema.setdefault(r.schema_version, []).append(
            (
                r.normalized,
                Entry(json.loads(r.parse) if r.parse else None, bool(r.valid), float(r.confidence), r.model_version),
            )
        )
    n = sum(cache.put_many(items, schema) for schema, items in by_schema.items())
    return {
        "loaded": n,
        "skipped_invalid": len(labels) - len(kept),
        "model_versions": sorted(set(kept["model_version"])),
    }
