"""The `querytune` command: one typer sub-app per command group (see each module for its commands)."""

from __future__ import annotations

import typer

from querytune.cli import cache, data, eval, index, label, predict, schema, serve, train, world

app = typer.Typer(
    name="querytune",
    help="Query understanding for local-service search: schema, simulated world, retrieval, training, prediction, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(schema.app, name="schema")
app.add_typer(data.app, name="data")
app.add_typer(world.app, name="world")
app.add_typer(index.app, name="index")
app.add_typer(eval.app, name="eval")
app.add_typer(train.app, name="train")
app.add_typer(cache.app, name="cache")
app.command(name="predict")(predict.predict)
app.command(name="label")(label.label)
app.command(name="serve")(serve.serve)
