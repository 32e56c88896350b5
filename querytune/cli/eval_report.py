"""`querytune eval report` and `querytune eval diff`: the relevance report of a workspace, and what changes between
two models on a log (registered on `querytune eval` by querytune/cli/eval.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import Progress, track
from rich.table import Table

from querytune.cli.common import FORCE_HELP, UserError, out_console, prepare_out, user_errors


def report(
    workspace: Path = typer.Option(
        Path("workspace"),
        "--workspace",
        help="Workspace folder: world/, index/, models/<stage>/predictions_test.jsonl, and optionally labels/, "
        "eval/serving.json, real/<name>/parse_*.json.",
    ),
    world: Path = typer.Option(None, "--world", help="World folder, if not WORKSPACE/world."),
    index: Path = typer.Option(None, "--index", help="Index folder, if not WORKSPACE/index."),
    models: Path = typer.Option(
        None, "--models", help="Folder of model folders (one per stage), if not WORKSPACE/models."
    ),
    out: Path = typer.Option(None, "--out", help="Report folder, if not WORKSPACE/report."),
    baseline: str = typer.Option(
        None,
        "--baseline",
        help="The system every other is compared with on the same queries (paired intervals, a forest plot): "
        "a stage name, raw, bm25, peer or oracle (default: self_train where the workspace has it, "
        "the fair control of the reward stages; else the first model stage, sft).",
    ),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Write the relevance report: report/index.html (self-contained, with plots), metrics.json, summary.md and
    parses.sqlite (every test query's parses, to browse in Datasette).

    Every stage side by side (raw, bm25, a MiniLM + logistic-regression peer, each model, oracle) with bootstrap
    95% intervals, and each against the baseline with paired intervals; per-slot F1, intent confusion and the
    calibration of the parse confidence; slices by intent, traffic, city, phrasing effect and seen phrasing; training
    curves; the queries where stages disagree most; the cache's coverage of the log against its size; labeling,
    serving and real-data figures when the workspace holds them. Models are not run again: each stage's saved test
    predictions are scored.
    """
    from querytune.evaluation.report import Workspace, build_report, fmt, signed

    ws = Workspace.at(workspace, world=world, index=index, models=models, report=out)
    with user_errors():
        prepare_out(ws.report, force, inputs=[ws.world, ws.index, ws.models, ws.labels, ws.eval, ws.real])
        try:
            metrics = build_report(
                ws,
                say=out_console.print,
                baseline=baseline,
                progress=lambda it: track(it, description="searching test queries", console=out_console),
            )
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from e
    table = Table(title=f"every stage on {metrics['meta']['test_rows']} test queries (95% bootstrap intervals)")
    cols = ("ndcg@10", "recall@10", "mrr", "intent_accuracy", "slot_f1", "frame_exact_match")
    table.add_column("system")
    for c in cols:
        table.add_column(c, justify="right")
    for name, entry in metrics["intervals"].items():
        table.add_row(name, *(fmt(entry.get(c)) for c in cols))
    out_console.print(table)
    paired = Table(title=f"difference from {metrics['baseline']} on the same queries (paired 95% bootstrap intervals)")
    paired.add_column("system")
    for c in ("ndcg@10", "intent_accuracy", "slot_f1"):
        paired.add_column(c, justify="right")
    for name, entry in metrics["paired"].items():
        paired.add_row(name, *(signed(entry.get(c)) for c in ("ndcg@10", "intent_accuracy", "slot_f1")))
    out_console.print(paired)
    out_console.print(f"wrote {ws.report / 'index.html'}, metrics.json, summary.md, parses.sqlite")


def diff(
    a: Path = typer.Argument(
        None, help="The served model: a model folder, or a labeling folder of `querytune label`.", show_default=False
    ),
    b: Path = typer.Argument(None, help="The candidate: a model folder, or a labeling folder.", show_default=False),
    old_a: Path = typer.Option(None, "--a", hidden=True, help="Deprecated spelling of A."),
    old_b: Path = typer.Option(None, "--b", hidden=True, help="Deprecated spelling of B."),
    log: Path = typer.Option(..., "--log", help="Query log (Parquet, CSV or JSONL) whose traffic weighs each query."),
    column: str = typer.Option("query", "--column", help="The log's query column."),
    index: Path = typer.Option(
        None,
        "--index",
        help="Index folder: also score each changed query's retrieval (NDCG@10 against the log's clicks, "
        "column `clicked`).",
    ),
    top: int = typer.Option(2000, "--top", min=1, help="Model folders: parse the N most typed distinct queries."),
    show: int = typer.Option(25, "--show", min=0, help="Changed queries to print (all go to --out)."),
    out: Path = typer.Option(None, "--out", help="Write the summary and every changed query as JSON here."),
) -> None:
    """List the logged queries whose parse changes from A to B, heaviest traffic first, with the retrieval effect."""
    from querytune.evaluation.diff import diff as run_diff

    with user_errors():
        for name, old in (("--a", old_a), ("--b", old_b)):
            if old is not None:
                out_console.print(
                    f"note: {name} is deprecated: give the two folders as arguments, `querytune eval diff A B`"
                )
        a, b = a or old_a, b or old_b
        if a is None or b is None:
            raise UserError("give the two folders to compare: `querytune eval diff A B --log LOG`")
        for name, path in (("A", a), ("B", b)):
            if not path.is_dir():
                raise UserError(f"{name} {path}: folder not found")
        if not log.is_file():
            raise UserError(f"--log {log}: file not found")
        with Progress(*Progress.get_default_columns(), console=out_console) as bar:

            def progress(what: str, total: int):
                task = bar.add_task(what, total=total)
                return lambda n: bar.advance(task, n)

            try:
                result = run_diff(a, b, log, index=index, top=top, column=column, progress=progress)
            except (FileNotFoundError, ValueError) as e:
                raise UserError(str(e)) from e
    s = result["summary"]
    scored = "reward_a" in (result["changed"][0] if result["changed"] else {})
    table = Table(
        title=f"{s['changed_queries']:,} of {s['compared_queries']:,} compared queries change parse: "
        f"{s['changed_traffic_share']:.1%} of the log's traffic"
    )
    for col in ("query", "rows", "traffic", "change", *(("reward A", "reward B") if scored else ())):
        table.add_column(col, justify="left" if col in ("query", "change") else "right")
    for r in result["changed"][:show]:
        table.add_row(
            r["query"],
            str(r["rows"]),
            f"{r['traffic_share']:.3%}",
            r["change"],
            *(
                (f"{r['reward_a']:.3f}" if "reward_a" in r else "", f"{r['reward_b']:.3f}" if "reward_b" in r else "")
                if scored
                else ()
            ),
        )
    out_console.print(table, markup=False)
    if "reward_change_on_changed" in s:
        out_console.print(
            "retrieval (NDCG@10 vs clicks) on the changed queries, traffic-weighted: "
            f"A {s['reward_a_weighted']:.3f} -> B {s['reward_b_weighted']:.3f} ({s['reward_change_on_changed']:+.3f}; "
            f"{s['better']} better, {s['worse']} worse); on all compared traffic "
            f"{s['reward_change_on_compared_traffic']:+.4f}",
            markup=False,
        )
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        out_console.print(f"wrote {out}")
