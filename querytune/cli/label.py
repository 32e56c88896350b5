"""`querytune label`: label a query log offline, one parse per distinct normalised query, every row accounted for.

querytune label runs/world/log.parquet --model runs/sft --out runs/labels [--column query]
        [--backend transformers|vllm] [--engine local|ray]
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from querytune.cli.common import Backend, Engine, UserError, prepare_out, user_errors
from querytune.query import MAX_QUERY_CHARS


def label(
    input: Path = typer.Argument(
        ..., help="Query log: a .csv, .jsonl or .parquet file, or a folder of them (read in name order)."
    ),
    model: Path = typer.Option(..., "--model", help="Model folder made by `querytune train ...`."),
    out: str = typer.Option(
        ...,
        "--out",
        help="Output folder: labels/part-*.parquet, rows.parquet (row -> label), rejects.jsonl, summary.json.",
    ),
    column: str = typer.Option(
        "query", "--column", help="Column (CSV, Parquet) or field (JSONL) that holds the query text."
    ),
    backend: Backend = typer.Option(
        "transformers", "--backend", help="transformers (any machine) or vllm (vLLM installed: `make vllm-env`)."
    ),
    where: str = typer.Option(None, "--where", help="Only rows whose COLUMN holds VALUE, e.g. period=early."),
    engine: Engine = typer.Option(
        "local",
        "--engine",
        help="local (this process) or ray (a Ray Data pipeline, one model replica per worker; RAY_ADDRESS joins a "
        "cluster).",
    ),
    workers: int = typer.Option(2, "--workers", min=1, help="--engine ray: model replicas (Ray actors)."),
    cpus_per_replica: int = typer.Option(
        1,
        "--cpus-per-replica",
        min=1,
        help="--engine ray: CPU cores each replica reserves and computes on (a vLLM CPU replica binds its node's "
        "cores: give it the node's count).",
    ),
    gpus_per_replica: float = typer.Option(
        0.0,
        "--gpus-per-replica",
        min=0.0,
        help="--engine ray --backend vllm on GPU nodes: the share of a GPU each replica reserves (0.25: four per "
        "GPU). 0 on CPU-only clusters.",
    ),
    int8: bool = typer.Option(
        False,
        "--int8",
        help="--backend transformers on CPU: int8 dynamic quantisation of the model's Linear layers but "
        "the MLP down projections: 1.35x the fp32 queries/s on log queries, parses within noise of fp32 "
        "(eval/RESULTS.md).",
    ),
    batch_size: int = typer.Option(
        32, "--batch-size", min=1, help="Queries per model call (batches are sorted by length)."
    ),
    shard_size: int = typer.Option(
        1024, "--shard-size", min=1, help="Distinct queries per output shard: the most work a kill can lose."
    ),
    max_chars: int = typer.Option(
        MAX_QUERY_CHARS, "--max-chars", min=1, help="Reject queries longer than this after normalisation."
    ),
    restart: bool = typer.Option(
        False,
        "--restart",
        help="Delete this folder's labels and start over (default: resume). A folder holding files a labeling run "
        "does not write is refused without it, and emptied first with it.",
    ),
) -> None:
    """Normalise, deduplicate and label every query of INPUT with a model; killed and run again, it resumes."""
    from querytune.labeling.label import label as run_label
    from querytune.labeling.log_input import LabelInputError

    console = Console(stderr=True)
    with user_errors(), ExitStack() as held:
        if not out.strip():
            raise UserError("--out: give a folder for the labels (an empty path would write into the current one)")
        out = Path(out)
        if not model.is_dir():
            raise UserError(f"--model {model}: folder not found")
        if int8 and backend != "transformers":
            raise UserError("--int8: only the transformers backend quantises (vLLM has its own --dtype)")
        if gpus_per_replica and (engine != "ray" or backend != "vllm"):
            raise UserError(
                "--gpus-per-replica needs --engine ray --backend vllm (the transformers backend runs on CPU)"
            )
        from querytune.labeling.label import OWN, lock_folder
        from querytune.labeling.log_input import input_files
        from querytune.runtime.backends import load_backend

        try:
            input_files(input)  # a missing or empty input fails before the model loads
            # a labeling folder resumes (its --restart happens under the lock); one holding anything else is refused
            own = out.is_dir() and all(p.name in OWN or p.name.endswith(".tmp") for p in out.iterdir())
            prepare_out(out, restart and not own, resume=own, inputs=[input, model], force_flag="--restart")
            held.enter_context(lock_folder(out))  # and so does a folder another run is writing; `label` holds it on
        except LabelInputError as e:
            raise UserError(str(e)) from e
        stream = None
        if engine == "ray":
            from querytune.labeling.ray_engine import RayEngine

            model_backend = RayEngine(
                model,
                backend=backend,
                workers=workers,
                batch_size=batch_size,
                threads_per_worker=cpus_per_replica,
                gpus_per_replica=gpus_per_replica,
                int8=int8,
            )
            stream = model_backend.stream
        else:
            model_backend = load_backend(backend, model, batch_size=batch_size, **({"int8": True} if int8 else {}))
        columns = [
            TextColumn("[bold]labeling"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("label", total=None, rate="")
            state = {"start": None}

            def progress(done: int, total: int) -> None:
                import time

                if state["start"] is None:
                    state["start"], state["first"] = time.perf_counter(), done
                elapsed = time.perf_counter() - state["start"]
                rate = (done - state["first"]) / elapsed if elapsed > 0 else 0.0
                bar.update(task, completed=done, total=total, rate=f"{rate:.1f} q/s" if rate else "")

            try:
                summary = run_label(
                    input,
                    out,
                    model_backend,
                    column=column,
                    where=where,
                    shard_size=shard_size,
                    restart=restart,
                    max_chars=max_chars,
                    progress=progress,
                    stream=stream,
                )
            except LabelInputError as e:
                raise UserError(str(e)) from e
            finally:
                if engine == "ray":
                    model_backend.shutdown()
        console.print(
            f"rows {summary['rows']:,}  accepted {summary['accepted']:,}  rejected {summary['rejected']:,}"
            f"  distinct {summary['distinct']:,}  labeled now {summary['labeled_now']:,}"
            f" (resumed {summary['resumed']:,})  invalid {summary['invalid']:,}"
            f"  {summary['queries_per_s'] or 0:.1f} queries/s  {summary['rows_per_s']:.1f} rows/s"
        )
        if summary["rejected"]:
            console.print(f"rejected rows (file, line, reason): {out / 'rejects.jsonl'}")
        typer.echo(
            json.dumps(
                {
                    k: summary[k]
                    for k in (
                        "rows",
                        "accepted",
                        "rejected",
                        "distinct",
                        "labeled_now",
                        "resumed",
                        "invalid",
                        "queries_per_s",
                        "rows_per_s",
                        "model_version",
                    )
                }
            )
        )
