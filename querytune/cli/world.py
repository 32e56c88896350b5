"""`querytune world ...`: make the simulated local-service world and look at it."""

from __future__ import annotations

import json
import random
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from querytune.cli.common import FORCE_HELP, prepare_out, user_errors


class Profile(str, Enum):
    v2 = "v2"
    stationary = "stationary"
    v1 = "v1"


app = typer.Typer(
    help="Make and inspect the simulated local-service world (the embedded default data).", no_args_is_help=True
)
out_console = Console()

# What the issue asks of the world; `world make` prints each figure next to its requirement.
CHECKS = [
    ("catalog.businesses", ">=", 5000),
    ("catalog.cities", ">=", 20),
    ("catalog.categories", ">=", 40),
    ("catalog.cuisines", ">=", 15),
    ("log.rows", ">=", 100_000),
    ("log.distinct_queries", ">=", 25_000),
    ("log.share_rows_seen_once", ">=", 0.20),
    ("log.share_traffic_top1pct_queries", ">=", 0.30),
    ("log.share_clicks_not_satisfying", ">=", 0.15),
    ("seed.label_error_rate", "in", (0.05, 0.10)),
    ("dev.rows", ">=", 1000),
    ("test.rows", ">=", 1000),
]


def _get(stats: dict, dotted: str):
    for part in dotted.split("."):
        stats = stats[part]
    return stats


@app.command()
def make(
    out: Path = typer.Option(..., "--out", help="Folder to write the world into (created if missing)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed always gives byte-identical files."),
    rows: int = typer.Option(120_000, "--rows", min=1000, help="Query-log rows to simulate."),
    per_city: int = typer.Option(
        280, "--per-city", min=60, help="Businesses in an average city (big cities get more)."
    ),
    eval_rows: int = typer.Option(
        1200,
        "--eval-rows",
        min=50,
        help="Queries in dev.jsonl and in test.jsonl (fewer when the later log holds too few distinct texts).",
    ),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    profile: Profile = typer.Option(
        Profile.v2,
        "--profile",
        help="v2: the log knows what the annotation guideline does not "
        "(taxonomy, drift, generic-word names, filter wording; docs/world.md); stationary: the v2 "
        "market with guideline = need and no drift (the control world); v1: the earlier world, byte for byte.",
    ),
) -> None:
    """Make the world: catalog.parquet, log.parquet, seed/dev/test.jsonl, stats.json, audit/."""
    from querytune.world.make import make_world

    with user_errors(), out_console.status("making the world") as status:
        prepare_out(out, force)
        stats = make_world(
            out,
            seed=seed,
            rows=rows,
            per_city=per_city,
            profile=profile.value,
            eval_rows=eval_rows,
            progress=lambda phase: status.update(f"making the world: {phase}"),
        )
    table = Table(title=f"world {out} (seed {seed})")
    for col in ("figure", "value", "required", "ok"):
        table.add_column(col)
    for key, op, want in CHECKS:
        value = _get(stats, key)
        ok = value >= want if op == ">=" else want[0] <= value <= want[1]
        table.add_row(
            key,
            f"{value:,}" if isinstance(value, int) else f"{value:.3f}",
            f"{op} {want}",
            "yes" if ok else "[red]NO[/red]",
        )
    for key in (
        "dev.share_seen_in_early_log",
        "dev.share_phrasing_in_seed",
        "test.share_seen_in_early_log",
        "test.share_phrasing_in_seed",
        "seed.rows",
        "log.clicks",
    ):
        value = _get(stats, key)
        table.add_row(key, f"{value:,}" if isinstance(value, int) else f"{value:.3f}", "", "")
    if "mechanisms" in stats:
        mech = stats["mechanisms"]
        for name, want in mech["required_test_share"].items():
            for part in ("dev", "test"):
                value = mech[part][name]
                ok = abs(value - want) <= 0.01 if stats["profile"] == "v2" or name != "drift" else True
                table.add_row(
                    f"{part} share: {name}",
                    f"{value:.3f}",
                    f"{want:.2f} ± 0.01" + ("" if stats["profile"] == "v2" else " (v2)"),
                    "yes" if ok else "[red]NO[/red]",
                )
            table.add_row(f"log share: {name}", f"{mech['log_share'][name]:.3f}", "", "")
        table.add_row("logging ranker NDCG@10", f"{stats['ranker']['ndcg10']:.3f}", "", "")
        table.add_row("impressions randomised", f"{stats['ranker']['share_impressions_randomised']:.3f}", "", "")
        hood = stats["neighborhood_only"]
        table.add_row(
            "neighbourhood-only rows unsatisfiable",
            f"{hood['unsatisfiable']:,} of {hood['rows']:,}",
            "0",
            "yes" if hood["unsatisfiable"] == 0 else "[red]NO[/red]",
        )
    out_console.print(table)
    out_console.print(f"intents in the log: {json.dumps(stats['log']['intents'])}")


@app.command()
def sample(
    world: Path = typer.Option(..., "--world", help="A folder made by `querytune world make`."),
    n: int = typer.Option(20, "-n", help="Rows to show from each file."),
    seed: int = typer.Option(1, "--seed", help="Which random rows to show."),
) -> None:
    """Show random seed rows (with labels) and random log queries, to judge the world's realism."""
    import pandas as pd

    from querytune.labeled import seed_rows

    with user_errors():
        if not (world / "seed.jsonl").is_file():
            raise FileNotFoundError(f"{world}: no seed.jsonl here (run `querytune world make --out {world}`)")
        labeled = seed_rows(world)
        log = pd.read_parquet(world / "log.parquet", columns=["query", "user_city", "timestamp", "clicked"])
    rng = random.Random(seed)
    table = Table(title=f"{n} random seed rows")
    for col in ("text", "intent", "slots"):
        table.add_column(col)
    for row in rng.sample(labeled, min(n, len(labeled))):
        table.add_row(row["text"], row["intent"], json.dumps(row["slots"]))
    out_console.print(table)
    table = Table(title=f"{n} random log rows")
    for col in ("query", "user city", "time", "clicks"):
        table.add_column(col)
    for i in rng.sample(range(len(log)), min(n, len(log))):
        r = log.iloc[i]
        table.add_row(r["query"], r["user_city"], str(r["timestamp"]), str(len(r["clicked"])))
    out_console.print(table)


@app.command()
def traffic(
    world: Path = typer.Option(..., "--world", help="A folder made by `querytune world make`."),
    model: Path = typer.Option(..., "--model", help="The model folder the service serves."),
    index: Path = typer.Option(..., "--index", help="The world's index (`querytune index build`): the search."),
    days: str = typer.Option(
        ..., "--days", help="A-B: replay the log's requests of days A to B (since its first day, both included)."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for log.parquet and audit/regret.json."),
    explore_share: float = typer.Option(
        0.0, "--explore-share", min=0.0, max=1.0, help="Share of requests in the exploration bucket (as `serve`'s)."
    ),
    explore_salt: str = typer.Option("querytune", "--explore-salt", help="Salt of the bucket's hash."),
    explore_bucket_s: int = typer.Option(3600, "--explore-bucket-s", min=1, help="The hash's time bucket (seconds)."),
    bucket_of: Path = typer.Option(
        None,
        "--bucket-of",
        help="A traffic log.parquet: replay only its bucket's requests (the truth `eval offpolicy` is checked on); "
        "where --model served that log, its greedy parses are read from it, not decoded again.",
    ),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Replay the world's requests of some days through the serving service (with its exploration bucket), search
    with each served parse and let the world's users click: a log like the world's, plus each answer's policy and
    probability (docs/loop.md). The regret of exploring goes to OUT/audit/regret.json (evaluation only)."""
    from rich.progress import Progress

    with user_errors():
        from querytune.labeled import seed_rows
        from querytune.runtime.backends import load_backend
        from querytune.search import Searcher
        from querytune.serving.explore import Explorer
        from querytune.world.traffic import parse_days, replay

        span = parse_days(days)
        for flag, path, inside in (("--world", world, "log.parquet"), ("--index", index, "index.faiss")):
            if not (path / inside).is_file():
                raise FileNotFoundError(f"{flag} {path}: no {inside} here")
        if not (world / "audit" / "needs.parquet").is_file():
            raise FileNotFoundError(f"--world {world}: no audit/needs.parquet: the world's users need their needs")
        only = None
        if bucket_of is not None:
            import pandas as pd

            if not bucket_of.is_file():
                raise FileNotFoundError(f"--bucket-of {bucket_of}: file not found")
            taken = pd.read_parquet(bucket_of)
            only = set(taken.loc[taken["policy"] == "explore", "query_id"])
            if not only:
                raise ValueError(f"--bucket-of {bucket_of}: no request in the bucket (policy explore)")
        prepare_out(out, force, inputs=[world, model, index])
        backend = load_backend("transformers", model)
        parsed = None
        if bucket_of is not None and {"candidates", "model_version"} <= set(taken.columns):
            from querytune.evaluation.offpolicy import logged_greedy

            parsed = logged_greedy(taken[taken["policy"] == "explore"], backend.model_version)
        searcher = Searcher(index, backend.schema)
        explorer = Explorer.for_index(
            backend.schema,
            index,
            explore_share,
            embedder=searcher.embedder,
            seed_rows=seed_rows(world) or None,
            salt=explore_salt,
            bucket_s=explore_bucket_s,
        )
        with Progress(*Progress.get_default_columns(), console=out_console) as bar:

            def progress(what: str, total: int):
                task = bar.add_task(what, total=total)
                return lambda n: bar.advance(task, n)

            regret = replay(world, backend, searcher, explorer, span, out, progress, only, parsed)
    a, b = regret["all"], regret["bucket"]
    out_console.print(
        f"{regret['requests']:,} requests of days {span[0]}-{span[1]} served by {model}; {b['requests']:,} graded in "
        f"the bucket. True NDCG@10 (evaluation only, {out / 'audit' / 'regret.json'}): served {a['served_ndcg10']}, "
        f"greedy {a['greedy_ndcg10']}, regret {a['regret']}"
    )
    out_console.print(f"log: {out / 'log.parquet'}")


@app.command()
def extend(
    world: Path = typer.Option(..., "--world", help="A folder made by `querytune world make`."),
    traffic: list[Path] = typer.Option(
        ..., "--traffic", help="A log from `querytune world traffic` (repeatable): its rows join the world's log."
    ),
    out: Path = typer.Option(..., "--out", help="The next round's world folder (every file but audit/)."),
    placebo_seed: int = typer.Option(
        None,
        "--placebo-seed",
        help="The placebo round: permute the bucket's clicks within each term (a text's words the seed never "
        "writes) and city with this seed (pages and click counts kept, which page was right removed).",
    ),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """The next training round's world: the world's files without audit/, its log followed by the served traffic's
    rows (shown lists, display probabilities, clicks; the bucket's left out of the position-bias fit)."""
    from querytune.world.traffic import extend as extend_world

    with user_errors():
        if not (world / "log.parquet").is_file():
            raise FileNotFoundError(f"--world {world}: no log.parquet here")
        for path in traffic:
            if not path.is_file():
                raise FileNotFoundError(f"--traffic {path}: file not found")
        prepare_out(out, force, inputs=[world, *traffic])
        counts = extend_world(world, traffic, out, placebo_seed)
    out_console.print(
        f"{out}: the log's {counts.pop('log'):,} rows and " + ", ".join(f"{path}: {n:,}" for path, n in counts.items())
    )
