"""`querytune index ...`: build the FAISS index of the catalog and search it."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from querytune.cli.common import FORCE_HELP, IndexKind, UserError, prepare_out, user_errors

app = typer.Typer(help="Build the FAISS index of businesses and run searches on it.", no_args_is_help=True)
out_console = Console()


@app.command()
def build(
    world: Path = typer.Option(..., "--world", help="World folder holding catalog.parquet."),
    out: Path = typer.Option(..., "--out", help="Folder for index.faiss, catalog.parquet and meta.json."),
    kind: IndexKind = typer.Option(
        "flat", "--kind", help="flat: exact inner product (default); hnsw: approximate, for large catalogs."
    ),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Embed every business text with all-MiniLM-L6-v2 and store the vectors in FAISS."""
    import pandas as pd

    from querytune.search import Embedder, build_index

    with user_errors():
        if not (world / "catalog.parquet").is_file():
            raise UserError(f"{world}: no catalog.parquet here (run `querytune world make --out {world}`)")
        catalog = pd.read_parquet(world / "catalog.parquet")
        prepare_out(out, force, inputs=[world])
        build_index(catalog, out, Embedder(), kind=kind, progress=True)
    out_console.print(f"indexed {len(catalog):,} businesses ({kind}) into {out}")


@app.command()
def search(
    query: str = typer.Argument(..., help="The query text."),
    index: Path = typer.Option(..., "--index", help="Folder made by `querytune index build`."),
    city: str = typer.Option("new york", "--city", help="Request context: the user's city."),
    at: str = typer.Option("2026-10-23T19:30", "--at", help="Request context: local time, ISO format."),
    parse: str = typer.Option(
        None,
        "--parse",
        help='A parse as JSON ({"intent": ..., "slots": {...}}) to run as a structured search; '
        "without it the raw query is searched.",
    ),
    schema: Path = typer.Option(None, "--schema", help="Schema YAML for --parse (default: the local-service schema)."),
    k: int = typer.Option(10, "-k", min=1, help="Results to show."),
) -> None:
    """Search the index: the raw query in the user's city, or a structured search from --parse."""
    from querytune.schema_file import load_schema
    from querytune.search import Context, Searcher

    with user_errors():
        if not query.strip():
            raise UserError("the query is empty")
        try:
            ctx = Context(city, datetime.fromisoformat(at))
        except ValueError:
            raise UserError(f"--at: {at!r} is not an ISO date-time like 2026-10-23T19:30") from None
        searcher = Searcher(index, load_schema(schema))
        cities = sorted(set(searcher.city))
        if city not in cities:
            raise UserError(f"--city: {city!r} is not a city of this catalog ({', '.join(cities)})")
        if parse:
            hits = searcher.search(searcher.schema.parse(parse), ctx, k, fallback_text=query)
        else:
            hits = searcher.raw(query, ctx, k)
    cat = searcher.catalog.set_index("business_id")
    table = Table(title=f"{query!r} ({'structured' if parse else 'raw'}; {city}, {at})")
    for col in ("#", "business", "category", "neighborhood", "city", "price", "rating"):
        table.add_column(col)
    for i, b in enumerate(hits, 1):
        r = cat.loc[b]
        cuisine = f" ({r['cuisine']})" if isinstance(r["cuisine"], str) else ""
        table.add_row(
            str(i),
            f"{r['name']} [{b}]",
            r["category"] + cuisine,
            r["neighborhood"],
            r["city"],
            "$" * int(r["price_level"]),
            f"{r['rating']:.1f}",
        )
    out_console.print(table)
    if not hits:
        out_console.print(json.dumps({"results": []}))
