"""`querytune eval ...`: relevance evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

from querytune.cli.common import UserError, user_errors

app = typer.Typer(help="Evaluate retrieval (and, later, parses) on held-out data.", no_args_is_help=True)
out_console = Console()


@app.command()
def retrieval(
    world: Path = typer.Option(..., "--world", help="World folder (holds dev.jsonl and test.jsonl)."),
    index: Path = typer.Option(..., "--index", help="Index folder made by `querytune index build`."),
    out: Path = typer.Option(..., "--out", help="JSON report to write."),
    split: str = typer.Option("test", "--split", help="Which labeled file to score: test (report) or dev (tuning)."),
    k: int = typer.Option(10, "-k", min=1, help="Cut-off for NDCG@k and Recall@k."),
    schema: Path = typer.Option(None, "--schema", help="Schema YAML of the gold labels (default: the local-service schema)."),
) -> None:
    """Score raw, bm25 and oracle (gold-parse) retrieval: NDCG@k, Recall@k, MRR, sliced by traffic and intent."""
    from querytune.retrieval_eval import baseline_systems, evaluate, load_rows
    from querytune.schema import load_schema
    from querytune.search import Searcher

    with user_errors():
        path = world / f"{split}.jsonl"
        if split not in ("dev", "test"):
            raise UserError(f"--split: {split!r} must be dev or test")
        if not path.is_file():
            raise UserError(f"{path}: not found (run `querytune world make --out {world}`)")
        schema_ = load_schema(schema)
        searcher = Searcher(index, schema_)
        rows = load_rows(path)
        report = evaluate(rows, baseline_systems(searcher, schema_, k), k=k,
                          progress=lambda it: track(it, description=f"searching {split}", console=out_console))
    report["meta"] |= {"split": split, "world": world.name, "index": searcher.meta, "schema_version": schema_.version}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    systems = [s for s in report if s not in ("slices", "per_row", "meta")]
    table = Table(title=f"retrieval on {split} (n={report['meta']['n']})")
    table.add_column("system")
    for metric in report[systems[0]]:
        table.add_column(metric, justify="right")
    for s in systems:
        table.add_row(s, *(f"{v:.3f}" for v in report[s].values()))
    out_console.print(table)
    out_console.print(f"wrote {out}")
