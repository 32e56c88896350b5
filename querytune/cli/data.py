"""`querytune data`: check a labeled file (JSONL, CSV, Parquet) against a schema before using it.

    querytune data validate labels.jsonl [--schema data/schema.yaml] [--rejects rejects.jsonl] [--max-errors 20]

Prints rows ok / rejected and the intent counts. Rejects go to stderr as ``FILE:LINE: reason`` (exit 1),
or with ``--rejects`` to a JSONL file (exit 0 if any row is ok). A file or schema that cannot be used
at all exits 2 with ``error: <message>``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from querytune.cli.common import FORCE_HELP, prepare_out, user_errors
from querytune.labeled import (
    LabeledDataError,
    in_train_split,
    load_labeled,
    schema_hint,
    write_labeled,
    write_rejects,
)
from querytune.schema import SchemaError
from querytune.schema_file import load_schema

app = typer.Typer(help="Labeled data: validate a labeled file against a schema.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Labeled data: validate a labeled file against a schema."""


def _load(file: Path, schema: Optional[Path]):
    """Schema and labeled rows, or `error: ...` and exit 2 for a file or schema that cannot be used."""
    try:
        sch = load_schema(schema)
        rows, bad = load_labeled(file, sch)
    except (LabeledDataError, SchemaError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    return sch, rows, bad


@app.command()
def validate(
    file: Path = typer.Argument(
        ...,
        help="Labeled file: .jsonl/.json (one object a line), .csv or .parquet, "
        "with columns text, intent, slots (and optionally id).",
    ),
    schema: Optional[Path] = typer.Option(None, "--schema", help="Schema YAML (default: data/schema.yaml)."),
    rejects: Optional[Path] = typer.Option(
        None, "--rejects", help="Write every rejected row here as JSONL (line, reason, raw) instead of failing."
    ),
    max_errors: int = typer.Option(
        20, "--max-errors", min=0, help="How many rejects to print when there is no --rejects."
    ),
) -> None:
    """Load FILE, check every row against the schema, and summarise."""
    sch, rows, bad = _load(file, schema)
    typer.echo(f"{file}: {len(rows)} rows ok, {len(bad)} rejected (schema {sch.name} {sch.version})")
    table = Table("intent", title="intents")
    table.add_column("rows", justify="right")
    for intent, n in Counter(r.intent for r in rows).most_common():
        table.add_row(intent, str(n))
    if rows:
        Console().print(table)
    if not bad:
        return
    hint = schema_hint(bad, schema is not None)
    if rejects is None:
        for r in bad[:max_errors]:
            typer.echo(f"{file}:{r.where}: {r.reason}", err=True)
        if len(bad) > max_errors:
            typer.echo(f"... and {len(bad) - max_errors} more (--rejects FILE writes them all)", err=True)
        if hint:
            typer.echo(hint, err=True)
        raise typer.Exit(1)
    write_rejects(bad, rejects)
    typer.echo(f"wrote {len(bad)} rejects to {rejects}")
    if hint:
        typer.echo(hint, err=True)
    if not rows:
        raise typer.Exit(1)


@app.command()
def split(
    file: Path = typer.Argument(..., help="Labeled file (JSONL, CSV or Parquet) with an id column."),
    out: Path = typer.Option(..., "--out", help="Folder for train.jsonl and heldout.jsonl."),
    schema: Optional[Path] = typer.Option(None, "--schema", help="Schema YAML (default: data/schema.yaml)."),
    train_share: float = typer.Option(0.8, "--train-share", min=0.01, max=0.99, help="Share of rows for train.jsonl."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Split a labeled file by a hash of each row's id: fixed, whatever the order or size of the file."""
    sch, rows, bad = _load(file, schema)
    if bad:
        for r in bad[:20]:
            typer.echo(f"{file}:{r.where}: {r.reason}", err=True)
        typer.echo(f"error: {len(bad)} rows do not fit the schema (fix them or drop them first)", err=True)
        if hint := schema_hint(bad, schema is not None):
            typer.echo(hint, err=True)
        raise typer.Exit(1)
    with user_errors():
        prepare_out(out, force, inputs=[file, schema])
    out.mkdir(parents=True, exist_ok=True)
    train = [r for r in rows if in_train_split(r.id, train_share)]
    heldout = [r for r in rows if not in_train_split(r.id, train_share)]
    write_labeled(train, out / "train.jsonl")
    write_labeled(heldout, out / "heldout.jsonl")
    typer.echo(f"{len(train)} rows -> {out / 'train.jsonl'}, {len(heldout)} rows -> {out / 'heldout.jsonl'}")


@app.command()
def world(
    seed: Path = typer.Option(
        ..., "--seed", help="Your labeled rows (text, intent, slots): what SFT and RFT start from."
    ),
    log: Path = typer.Option(
        ...,
        "--log",
        help="Your search log: query, timestamp, user_city, shown, clicked (optional display_p, policy, query_id).",
    ),
    catalog: Path = typer.Option(
        ..., "--catalog", help="Your businesses: business_id, name, city (optional category, cuisine, ..., text)."
    ),
    out: Path = typer.Option(..., "--out", help="The world folder to write (then `index build --world OUT`)."),
    schema: Optional[Path] = typer.Option(None, "--schema", help="Schema YAML (default: data/schema.yaml)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Make a world folder of your own seed rows, search log and catalogue (docs/data.md): every reward stage and
    the miner then read it as they read the simulated world's; bad rows go to OUT/rejects.jsonl with file and line."""
    import json

    from querytune.own_world import assemble

    with user_errors():
        sch = load_schema(schema)
        for flag, path in (("--seed", seed), ("--log", log), ("--catalog", catalog)):
            if not path.is_file():
                raise FileNotFoundError(f"{flag} {path}: file not found")
        prepare_out(out, force, inputs=[seed, log, catalog])
        try:
            counts = assemble(seed, log, catalog, out, sch)
        except LabeledDataError as e:
            raise ValueError(str(e)) from None
    rejected = counts["rejected"]
    Console().print(
        f"{out}: {counts['seed_rows']:,} seed rows, {counts['log_rows']:,} searches, {counts['businesses']:,} "
        f"businesses; rejected: {json.dumps(rejected)}; businesses shown but not in the catalogue: "
        f"{counts['shown_not_in_catalog']}"
        + (f" (reasons in {out / 'rejects.jsonl'})" if any(rejected.values()) or counts["shown_not_in_catalog"] else "")
    )
