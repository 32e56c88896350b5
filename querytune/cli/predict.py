"""`querytune predict`: parse queries with a trained model folder and print the parses as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from querytune.cli.common import UserError, user_errors


def predict(
    queries: list[str] = typer.Argument(..., help="One or more queries (quote each)."),
    model: Path = typer.Option(..., "--model", help="Model folder made by `querytune train ...`."),
    schema: Path = typer.Option(None, "--schema", help="Schema YAML (default: the one stored in the model folder)."),
    constrained: bool = typer.Option(
        True, "--constrained/--free", help="Decode constrained to the schema's JSON (default) or freely."
    ),
) -> None:
    """Print one JSON line per query: text, parse, valid, confidence, model_version (and the error when invalid)."""
    from querytune.runtime.generate import Parser
    from querytune.schema_file import load_schema

    with user_errors():
        if not model.is_dir():
            raise UserError(f"--model {model}: folder not found")
        parser = Parser(model, schema=load_schema(schema) if schema else None, constrained=constrained)
        for p in parser.parse(queries):
            row = {
                "text": p.text,
                "parse": p.parse,
                "valid": p.valid,
                "confidence": round(p.confidence, 4),
                "model_version": parser.model_version,
            }
            if p.error:
                row |= {"error": p.error, "raw": p.raw}
            typer.echo(json.dumps(row, ensure_ascii=False))
