"""`querytune schema`: show a label schema (intents, slots, version) or its JSON schema.

querytune schema show [--schema data/schemas/sgd.yaml] [--json-schema]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from querytune.schema import SchemaError
from querytune.schema_file import load_schema

app = typer.Typer(help="The label schema: intents and slots.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """The label schema: intents and slots."""


@app.command()
def show(
    schema: Optional[Path] = typer.Option(None, "--schema", help="Schema YAML (default: data/schema.yaml)."),
    json_schema: bool = typer.Option(
        False, "--json-schema", help="Print the JSON schema of a parse instead (what constrained decoding uses)."
    ),
) -> None:
    """Print the schema's name, version, intents and slots."""
    try:
        sch = load_schema(schema)
    except SchemaError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if json_schema:
        typer.echo(json.dumps(sch.json_schema(), indent=2, ensure_ascii=False))
        return
    console = Console(highlight=False)
    console.print(Text(f"{sch.name} (version {sch.version}): {len(sch.intents)} intents, {len(sch.slots)} slots"))
    if sch.description:
        console.print(Text(sch.description))
    intents = Table("intent", "description", "slots", title="intents")
    for i in sch.intents.values():
        taken = "any" if i.slots is None else ", ".join(i.slots) or "none"
        intents.add_row(Text(i.name), Text(i.description), Text(taken))
    slots = Table(title="slots")
    for col in ("slot", "type", "filter", "values", "grounded"):
        slots.add_column(col, no_wrap=col != "values")
    for s in sch.slots.values():
        filter_ = f"attribute:{s.attribute}" if s.filter == "attribute" else (s.filter or "")
        slots.add_row(
            Text(s.name),
            Text(s.type),
            Text(filter_),
            str(len(s.values)) if s.values else "",
            "yes" if s.grounded else "",
        )
    console.print(intents)
    console.print(slots)
