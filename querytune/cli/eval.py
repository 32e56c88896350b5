"""`querytune eval ...`: relevance evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import Progress, track
from rich.table import Table

from querytune.cli.common import UserError, named_models, out_console, user_errors

app = typer.Typer(help="Evaluate retrieval and parses on held-out data.", no_args_is_help=True)


@app.command()
def retrieval(
    world: Path = typer.Option(..., "--world", help="World folder (holds dev.jsonl and test.jsonl)."),
    index: Path = typer.Option(..., "--index", help="Index folder made by `querytune index build`."),
    out: Path = typer.Option(..., "--out", help="JSON report to write."),
    split: str = typer.Option("test", "--split", help="Which labeled file to score: test (report) or dev (tuning)."),
    k: int = typer.Option(10, "-k", min=1, help="Cut-off for NDCG@k and Recall@k."),
    schema: Path = typer.Option(
        None, "--schema", help="Schema YAML of the gold labels (default: the local-service schema)."
    ),
    model: list[str] = typer.Option(
        [],
        "--model",
        help="DIR, NAME=DIR or NAME=PREDICTIONS.jsonl: also score the structured search from this model's parses "
        "(repeatable; a DIR alone is named after its folder). DIR parses the rows now; "
        "a predictions file from `eval parse --predictions` is reused as is. An invalid parse falls back to the raw "
        "query.",
    ),
    baseline: str = typer.Option(
        None,
        "--baseline",
        help="Compare every other system with this one (e.g. sft): mean NDCG difference with a paired bootstrap 95% "
        "interval, overall and on queries whose phrasing the seed covers / does not.",
    ),
) -> None:
    """Score raw, bm25, oracle (gold-parse) and model retrieval: NDCG@k, Recall@k, MRR, sliced by traffic and intent."""
    from querytune.evaluation.retrieval_eval import baseline_systems, compare_to, evaluate, load_rows
    from querytune.schema_file import load_schema
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
        systems = baseline_systems(searcher, schema_, k)
        for name, model_dir in named_models(model):
            systems[name] = _model_system(model_dir, [r for r in rows if r.get("relevance")], searcher, k)
        if baseline and baseline not in systems:
            raise UserError(f"--baseline {baseline}: not one of the systems ({', '.join(systems)})")
        report = evaluate(
            rows, systems, k=k, progress=lambda it: track(it, description=f"searching {split}", console=out_console)
        )
        if baseline:
            report["vs_baseline"] = compare_to(report, baseline, k)
    report["meta"] |= {"split": split, "world": world.name, "index": searcher.meta, "schema_version": schema_.version}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report, f"retrieval on {split} (n={report['meta']['n']})")
    out_console.print(f"wrote {out}")


def _model_system(source: Path, rows: list[dict], searcher, k: int):
    """The structured search of a model's parses: parsed now (model folder) or read (predictions JSONL)."""
    if source.is_file():
        from querytune.evaluation.scores import load_predictions

        try:
            preds = load_predictions(source, rows)
        except ValueError as e:
            raise UserError(str(e)) from None
    else:
        from querytune.runtime.generate import Parser

        parser = Parser(source)
        with Progress(*Progress.get_default_columns(), console=out_console) as bar:
            task = bar.add_task(f"parsing with {source.name}", total=len(rows))
            parsed = parser.parse([r["text"] for r in rows], progress=lambda n: bar.advance(task, n))
        preds = {r["id"]: p.parse for r, p in zip(rows, parsed)}

    def system(row: dict, ctx) -> list[str]:
        pred = preds[row["id"]]
        if pred is None:
            return searcher.raw(row["text"], ctx, k)
        return searcher.search(searcher.schema.parse(pred), ctx, k, fallback_text=row["text"])

    return system


def _print_table(report: dict, title: str) -> None:
    systems = [s for s in report if s not in ("slices", "per_row", "meta", "vs_baseline")]
    vs = report.get("vs_baseline")
    table = Table(title=title)
    table.add_column("system")
    for metric in report[systems[0]]:
        table.add_column(metric, justify="right")
    if vs:
        table.add_column(f"ndcg vs {vs['baseline']} [95% CI]", justify="right")
        for part in ("covered", "uncovered"):
            table.add_column(f"vs {vs['baseline']}, {part}", justify="right")
    for s in systems:
        cells = [f"{v:.3f}" for v in report[s].values()]
        if vs:
            d = vs["systems"].get(s)
            cells += (
                [
                    f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]",
                    f"{d['covered']:+.3f}",
                    f"{d['uncovered']:+.3f}",
                ]
                if d
                else ["", "", ""]
            )
        table.add_row(s, *cells)
    out_console.print(table)


@app.command()
def parse(
    model: Path = typer.Option(..., "--model", help="Model folder made by `querytune train ...`."),
    data: Path = typer.Option(
        ..., "--data", help="Labeled JSONL / CSV / Parquet to score (e.g. a world's test.jsonl)."
    ),
    out: Path = typer.Option(..., "--out", help="JSON metrics to write."),
    schema: Path = typer.Option(None, "--schema", help="Schema YAML (default: the one stored in the model folder)."),
    predictions: Path = typer.Option(
        None,
        "--predictions",
        help="Also write one JSONL line per row: id, text, gold, pred, valid, confidence, model_version.",
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Queries per generation batch."),
    limit: int = typer.Option(None, "--limit", min=1, help="Score only the first N rows (quick looks)."),
    constrained: bool = typer.Option(
        True,
        "--constrained/--free",
        help="Decode constrained to the schema's JSON (default) or freely; use the same setting for every stage.",
    ),
) -> None:
    """Parse metrics: intent accuracy, slot P/R/F1, frame exact match, validity, queries/s, per intent and slot."""
    import time

    from querytune.evaluation.parse_eval import grounding_dropped, parse_metrics, ungrounded_share
    from querytune.labeled import load_labeled
    from querytune.runtime.generate import Parser
    from querytune.schema_file import load_schema

    with user_errors():
        if not model.is_dir():
            raise UserError(f"--model {model}: folder not found")
        parser = Parser(
            model, schema=load_schema(schema) if schema else None, batch_size=batch_size, constrained=constrained
        )
        rows, rejects = load_labeled(data, parser.schema)
        for r in rejects[:10]:
            out_console.print(f"{data}:{r.where}: {r.reason} (not scored)", markup=False)
        rows = rows[:limit] if limit else rows
        if not rows:
            raise UserError(f"{data}: no rows to score")
        with Progress(*Progress.get_default_columns(), console=out_console) as bar:
            task = bar.add_task(f"parsing {data.name}", total=len(rows))
            start = time.perf_counter()
            preds = parser.parse([r.text for r in rows], progress=lambda n: bar.advance(task, n))
            seconds = time.perf_counter() - start
    golds = [{"intent": r.intent, "slots": r.slots} for r in rows]
    metrics = parse_metrics(golds, [p.parse for p in preds])
    metrics |= {
        "ungrounded_text_values": ungrounded_share([r.text for r in rows], [p.parse for p in preds], parser.schema),
        "grounding_dropped": grounding_dropped(preds, parser.schema),
        "queries_per_second": round(len(rows) / seconds, 2),
        "rejected_rows": len(rejects),
        "model": str(model),
        "model_version": parser.model_version,
        "data": str(data),
        "schema_version": parser.schema.version,
        "decoding": {"greedy": True, "constrained": constrained, "max_new_tokens": parser.max_new_tokens},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    if predictions:
        with open(predictions, "w", encoding="utf-8") as f:
            for r, g, p in zip(rows, golds, preds):
                f.write(
                    json.dumps(
                        {
                            "id": r.id,
                            "text": r.text,
                            "gold": g,
                            "pred": p.parse,
                            "valid": p.valid,
                            "confidence": round(p.confidence, 5),
                            "model_version": parser.model_version,
                            **({"error": p.error, "raw": p.raw} if p.error else {}),
                            **({"ungrounded": p.ungrounded} if p.ungrounded else {}),
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
    table = Table(title=f"parse metrics: {model.name} on {data.name} (n={metrics['n']})")
    keys = (
        "intent_accuracy",
        "slot_precision",
        "slot_recall",
        "slot_f1",
        "frame_exact_match",
        "validity",
        "queries_per_second",
    )
    for key in keys:
        table.add_column(key, justify="right")
    table.add_row(*(f"{metrics[k]:.3f}" if k != "queries_per_second" else f"{metrics[k]:.1f}" for k in keys))
    out_console.print(table)
    out_console.print(f"wrote {out}")


@app.command()
def stages(
    retrieval_report: Path = typer.Option(
        ..., "--retrieval", help="JSON from `eval retrieval --baseline ...` with every stage's predictions."
    ),
    model: list[str] = typer.Option(
        [],
        "--model",
        help="A stage's model folder, DIR or NAME=DIR (named as in the retrieval report), "
        "whose `parse_test.json` and `predictions_test.jsonl` exist (repeatable, in order).",
    ),
    stage: list[str] = typer.Option([], "--stage", hidden=True, help="Deprecated spelling of --model NAME=DIR."),
    data: Path = typer.Option(
        ..., "--data", help="The labeled file the stages were scored on (its phrasing_in_seed flags split the table)."
    ),
    out: Path = typer.Option(None, "--out", help="Also write the table as JSON here."),
) -> None:
    """One table with every stage: parse metrics and retrieval, overall and split by whether the seed covers the
    phrasing."""
    from querytune.evaluation.parse_eval import parse_metrics, ungrounded_share
    from querytune.evaluation.retrieval_eval import load_rows
    from querytune.evaluation.scores import read_predictions
    from querytune.schema_file import load_schema

    with user_errors():
        report = json.loads(retrieval_report.read_text())
        flags = {r["id"]: r.get("phrasing_in_seed") for r in load_rows(data)}
        vs = report.get("vs_baseline", {"systems": {}, "baseline": None})
        table_rows = {}
        if stage:
            out_console.print("note: --stage is deprecated: give each stage as --model NAME=DIR")
        if not model + stage:
            raise UserError("give each stage's model folder: --model NAME=DIR (repeatable)")
        for name, folder in named_models(model + stage):
            if not (folder / "predictions_test.jsonl").is_file():
                raise UserError(
                    f"--model {name}={folder}: {folder / 'predictions_test.jsonl'} not found (run `eval parse "
                    "--predictions` first)"
                )
            if name not in report:
                raise UserError(f"--model {name}: not a system of {retrieval_report}")
            preds = list(read_predictions(folder / "predictions_test.jsonl").values())
            schema = load_schema(folder / "schema.yaml")
            row = {"ndcg@10": report[name]["ndcg@10"], "vs_baseline": vs["systems"].get(name)}
            for part, want in (("all", None), ("covered", True), ("uncovered", False)):
                sub = [p for p in preds if want is None or flags.get(p["id"]) is want]
                m = parse_metrics([p["gold"] for p in sub], [p["pred"] if p["valid"] else None for p in sub])
                row[part] = {
                    "n": m["n"],
                    "intent_accuracy": m["intent_accuracy"],
                    "slot_f1": m["slot_f1"],
                    "frame_exact_match": m["frame_exact_match"],
                    "validity": m["validity"],
                }
            row["ungrounded_text_values"] = ungrounded_share(
                [p["text"] for p in preds], [p["pred"] for p in preds], schema
            )
            table_rows[name] = row
    table = Table(
        title=f"every stage on {data.name}"
        + (f" (NDCG difference vs {vs['baseline']}, paired bootstrap 95% CI)" if vs["baseline"] else "")
    )
    for col in (
        "stage",
        "intent",
        "slot F1",
        "frame EM",
        "F1 covered",
        "F1 uncovered",
        "ungrounded",
        "NDCG@10",
        "vs baseline [95% CI]",
        "covered",
        "uncovered",
    ):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, r in table_rows.items():
        d = r["vs_baseline"]
        table.add_row(
            name,
            f"{r['all']['intent_accuracy']:.3f}",
            f"{r['all']['slot_f1']:.3f}",
            f"{r['all']['frame_exact_match']:.3f}",
            f"{r['covered']['slot_f1']:.3f}",
            f"{r['uncovered']['slot_f1']:.3f}",
            f"{r['ungrounded_text_values']:.3f}",
            f"{r['ndcg@10']:.3f}",
            f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "",
            f"{d['covered']:+.3f}" if d else "",
            f"{d['uncovered']:+.3f}" if d else "",
        )
    out_console.print(table)
    if out:
        out.write_text(json.dumps(table_rows, indent=2) + "\n")
        out_console.print(f"wrote {out}")


from querytune.cli.eval_report import diff, report  # noqa: E402  (after the commands above: --help lists them in this order)

app.command()(report)
app.command()(diff)


@app.command()
def offpolicy(
    log: Path = typer.Option(
        ..., "--log", help="A log with an exploration bucket (`querytune world traffic --explore-share`'s log.parquet)."
    ),
    model: list[str] = typer.Option(
        ..., "--model", help="DIR or NAME=DIR (repeatable): estimate each; the others are compared with the first."
    ),
    metric: str = typer.Option("ctr", "--metric", help="Click reward: ctr (a click or not) or clicks (how many)."),
    out: Path = typer.Option(None, "--out", help="Also write the estimates here (JSON)."),
) -> None:
    """Estimate each model's click reward from the bucket's logged answers, before it serves: self-normalised inverse
    propensity scoring with a 95% bootstrap interval, and the share of requests the bucket can judge (support)."""
    from querytune.evaluation.offpolicy import estimate, model_parses, read_bucket
    from querytune.runtime.backends import load_backend

    with user_errors():
        bucket = read_bucket(log)
        models = named_models(model)
        parses = {}
        for name, model_dir in models:
            if not model_dir.is_dir():
                raise UserError(f"--model {model_dir}: folder not found")
            backend = load_backend("transformers", model_dir)
            with Progress(*Progress.get_default_columns(), console=out_console) as bar:
                task = bar.add_task(f"parsing with {name}", total=bucket["query"].nunique())
                parses[name] = model_parses(backend, bucket, lambda n, task=task: bar.advance(task, n))
        result = estimate(bucket, parses, metric)
    table = Table(title=f"{metric} on {result['requests']:,} bucket requests of {log} (logged: {result['logged']:.4f})")
    for col in ("model", "estimate", "95% interval", "support", "matched", "effective n", "vs first"):
        table.add_column(col)
    for name, m in result["models"].items():
        d = m.get("vs_first")
        table.add_row(
            name,
            f"{m['estimate']:.4f}",
            f"[{m['low']:.4f}, {m['high']:.4f}]",
            f"{m['support']:.3f}",
            f"{m['matched']:,}",
            f"{m['effective_n']:,.1f}",
            f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else "",
        )
    out_console.print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out_console.print(f"wrote {out}")
