"""Live traffic from the world: its logged requests of some days replayed through the product's serving service,
searched with each served parse, and clicked by the world's own users.

    querytune world traffic --world W --model M --index I --days 28-41 --explore-share 0.1 --out OUT

Writes, byte-identical for the same inputs:
- OUT/log.parquet: one row per replayed request, the world log's columns (`shown` and `clicked` are now the
  product's: the FAISS search of the served parse, and what the user clicked in it) plus `policy` (`greedy`, or
  `explore` in the bucket), `propensity` (the served parse's probability; 1 for greedy), `candidates` (JSON: every
  candidate parse and its probability, bucket rows only), `parse` (JSON: the parse served, null when the model's was
  invalid and the raw text was searched) and `model_version`. `display_p` is each shown business's probability of
  being shown at its position under the proposal (1 for greedy rows).
- OUT/audit/regret.json, for evaluation only (no training stage reads audit/): the served and greedy results' true
  NDCG@10 from the hidden needs, over all graded requests and over the bucket's; their difference is the round's
  regret, the price of exploring.

The users (same rows, times and texts as the log) are the world's: the relevance grades of `querytune.world.needs`
and the cascade of `querytune.world.log.cascade_clicks`, with its uniforms drawn per request and position from a
stream seeded by the world's seed and the request's id, so that a user examines and decides the same whatever the
policy shows. The model's parses are computed once for the distinct texts (as `cache warm` does) and the service
answers every request from them, in time order, with the bucket's hash on the request's own time.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from querytune.edits import STOP
from querytune.labeled import seed_rows
from querytune.metrics import ndcg_at_k
from querytune.runtime.backends import parse_many
from querytune.runtime.prediction import Prediction
from querytune.schema import WORD, normalize_text
from querytune.serving.explore import known_words
from querytune.world.log import START, cascade_clicks
from querytune.world.make import catalog_arrays
from querytune.world.needs import graded_relevance
from querytune.world.output import write_parquet
from querytune.world.vocab import CITIES

K = 10


class Answers:
    """A backend that answers from parses computed once (`TransformersBackend.parse` over the distinct texts): the
    service asks it for the invalid ones, which the cache does not keep."""

    def __init__(self, backend, predictions: dict[str, Any]):
        self.name, self.model_version, self.schema_version = (
            "precomputed",
            backend.model_version,
            backend.schema_version,
        )
        self.schema, self.predictions = backend.schema, predictions

    def parse(self, texts: list[str]) -> list[Any]:
        return [self.predictions[t] for t in texts]


def parse_days(days: str) -> tuple[int, int]:
    """ "A-B" (days since the log's first day, both included) as (A, B)."""
    try:
        a, b = (int(x) for x in days.split("-"))
    except ValueError:
        raise ValueError(f"--days {days!r}: give A-B, days since the log's first day (e.g. 28-41)") from None
    if not 0 <= a <= b:
        raise ValueError(f"--days {days!r}: A-B with 0 <= A <= B")
    return a, b


def replay(
    world: str | Path,
    backend,
    searcher,
    explorer,
    days: tuple[int, int],
    out: str | Path,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    only: set[str] | None = None,
    parsed: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Replay the world's requests of `days` (module doc) and write OUT; returns the regret record. `backend`: a
    model backend (its parses computed once here); `searcher`: a `querytune.search.Searcher` over the world's
    catalogue; `explorer`: a `querytune.serving.explore.Explorer` (share 0: greedy only); `progress(phase, total)`
    gives a callback advanced per item; `only`: replay just these request ids (a bucket's, for the truth an
    off-policy estimate is checked against: each user clicks as in any other replay); `parsed`: normalised text ->
    this model's valid greedy parse where already known (the bucket's own log, `offpolicy.logged_greedy`), not
    decoded again."""
    from querytune.serving.service import Service
    from querytune.serving.settings import Settings

    world, out = Path(world), Path(out)
    log = pd.read_parquet(world / "log.parquet")
    day = ((log["timestamp"] - pd.Timestamp(START)) // pd.Timedelta(days=1)).to_numpy()
    rows = log[(day >= days[0]) & (day <= days[1])]
    rows = (rows if only is None else rows[rows["query_id"].isin(only)]).reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"--days {days[0]}-{days[1]}: no logged request on those days (the log has {day.max() + 1})")
    needs = pd.read_parquet(world / "audit" / "needs.parquet", columns=["query_id", "intent", "slots"])
    needs = needs.set_index("query_id").loc[rows["query_id"]]
    world_seed = json.loads((world / "stats.json").read_text())["world_seed"]
    catalog = pd.read_parquet(world / "catalog.parquet")
    cat, ids = catalog_arrays(catalog), catalog["business_id"].astype(str).to_numpy()
    row_of = {b: i for i, b in enumerate(ids)}
    city_rows = {c: np.flatnonzero(cat["city"] == c) for c in CITIES}
    schema = backend.schema

    texts = list(dict.fromkeys(normalize_text(q) for q in rows["query"]))
    parsed = parsed or {}
    predictions = {t: Prediction(t, parsed[t], True, float("nan"), "") for t in texts if t in parsed}
    todo = [t for t in texts if t not in parsed]
    predictions |= parse_many(backend, todo, progress("parsing", len(todo)) if progress else None)

    settings = Settings(local_cache_entries=len(texts) + 1, deadline=3600.0, batch_window_ms=0.0)
    service = Service(
        Answers(backend, predictions), None, settings, backend.model_version, backend.schema_version, explorer
    )
    service.write_answers(list(predictions.items()), backend.model_version)

    def ranked(parse: dict | None, text: str, ctx) -> list[str]:
        return searcher.search(schema.parse(parse), ctx, K, fallback_text=text) if parse else searcher.raw(text, ctx, K)

    from querytune.search import Context

    async def run() -> tuple[list[dict], list[dict]]:
        service.batcher.start()
        records, scores = [], []
        step = progress("serving", len(rows)) if progress else None
        try:
            for r, need in zip(rows.itertuples(index=False), needs.itertuples(index=False)):
                ts = r.timestamp.to_pydatetime()
                [answer], _ = await service.answer([r.query], at=ts.timestamp())
                ctx = Context(r.user_city, ts)
                shown = ranked(answer["parse"], r.query, ctx)
                display_p = [1.0] * len(shown)
                greedy = shown
                if answer.get("policy") == "explore":
                    lists = [(c["p"], ranked(c["parse"], r.query, ctx)) for c in answer["candidates"]]
                    greedy = lists[0][1]
                    display_p = [
                        round(sum(p for p, other in lists if pos < len(other) and other[pos] == b), 6)
                        for pos, b in enumerate(shown)
                    ]
                rel = graded_relevance(
                    {"intent": need.intent, "slots": json.loads(need.slots)},
                    cat,
                    city_rows,
                    r.user_city,
                    ts.weekday(),
                    ts.hour * 60 + ts.minute,
                )
                draws = np.random.default_rng([world_seed, int(r.query_id[1:])]).random((K, 3))
                clicked = cascade_clicks(None, np.array([row_of[b] for b in shown], dtype=int), rel, draws)
                explored = answer.get("policy") == "explore"
                records.append(
                    {
                        "query_id": r.query_id,
                        "timestamp": r.timestamp,
                        "user_city": r.user_city,
                        "query": r.query,
                        "shown": shown,
                        "display_p": display_p,
                        "clicked": [str(ids[b]) for b in clicked],
                        "period": r.period,
                        "policy": "explore" if explored else "greedy",
                        "propensity": float(answer["propensity"]) if explored else 1.0,
                        "candidates": json.dumps(answer["candidates"], sort_keys=True) if explored else None,
                        "parse": json.dumps(answer["parse"], sort_keys=True) if answer["parse"] else None,
                        "model_version": answer["model_version"],
                    }
                )
                if any(g > 0 for g in rel.values()):
                    relevance = {str(ids[b]): g for b, g in rel.items()}
                    scores.append(
                        {
                            "explored": explored,
                            "served": ndcg_at_k(shown, relevance, K),
                            "greedy": ndcg_at_k(greedy, relevance, K),
                        }
                    )
                if step:
                    step(1)
        finally:
            await service.batcher.stop()
        return records, scores

    records, scores = asyncio.run(run())
    (out / "audit").mkdir(parents=True, exist_ok=True)
    write_parquet(pd.DataFrame.from_records(records), out / "log.parquet")
    regret = regret_record(scores, days, explorer, backend.model_version, len(records))
    (out / "audit" / "regret.json").write_text(json.dumps(regret, indent=2, sort_keys=True) + "\n")
    return regret


def regret_record(scores: list[dict], days: tuple[int, int], explorer, model_version: str, requests: int) -> dict:
    """The round's true NDCG@10, served and greedy, over every graded request and over the bucket's."""

    def part(rows: list[dict]) -> dict[str, Any]:
        if not rows:
            return {"requests": 0, "served_ndcg10": None, "greedy_ndcg10": None, "regret": None}
        served, greedy = float(np.mean([s["served"] for s in rows])), float(np.mean([s["greedy"] for s in rows]))
        return {
            "requests": len(rows),
            "served_ndcg10": round(served, 6),
            "greedy_ndcg10": round(greedy, 6),
            "regret": round(greedy - served, 6),
        }

    return {
        "days": list(days),
        "first_day": (START + timedelta(days=days[0])).date().isoformat(),
        "requests": requests,
        "explore_share": explorer.share if explorer is not None else 0.0,
        "model_version": model_version,
        "all": part(scores),
        "bucket": part([s for s in scores if s["explored"]]),
    }


def extend(world: str | Path, traffic: list[str | Path], out: str | Path, placebo_seed: int | None = None) -> dict:
    """A world folder for the next training round: `world`'s files but audit/ (training never reads it), its
    log.parquet followed by every `traffic` log's rows (what the served model showed and the users clicked, each
    id suffixed with its file's number so that no id repeats). Returns rows per source.

    `placebo_seed`: the placebo round: among the bucket's rows of one term in one city, the clicks are permuted
    (each row gets another row's clicked positions on its own shown list), so the bucket keeps its texts, pages and
    click counts but its clicks no longer say which page was right. A text's term: the words of it that the seed's
    texts never write (what the bucket explores, `querytune.serving.explore`), else the whole text; within one text
    alone, most of a new word's texts are typed once in a city and would keep their clicks."""
    import shutil

    world, out = Path(world), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(world.iterdir()):
        if path.is_file() and path.name != "log.parquet":
            shutil.copy2(path, out / path.name)
    log = pd.read_parquet(world / "log.parquet")
    parts, counts = [log], {"log": len(log)}
    known = known_words(r["text"] for r in seed_rows(world))
    for i, path in enumerate(traffic, 1):
        extra = pd.read_parquet(path)
        missing = [c for c in log.columns if c not in extra.columns]
        if missing:
            raise ValueError(f"--traffic {path}: no column {', '.join(missing)} (a log from `querytune world traffic`)")
        if placebo_seed is not None:
            extra, counts[f"{path}: bucket rows whose clicks moved"] = permuted_clicks(extra, placebo_seed + i, known)
        parts.append(extra.assign(query_id=extra["query_id"] + f"-t{i}"))
        counts[str(path)] = len(extra)
    merged = pd.concat(parts, ignore_index=True).sort_values(["timestamp", "query_id"], kind="stable")
    write_parquet(merged.reset_index(drop=True), out / "log.parquet")
    return counts


def permuted_clicks(log: pd.DataFrame, seed: int, known: frozenset[str] = frozenset()) -> tuple[pd.DataFrame, int]:
    """`log` with the bucket's click positions permuted within each (term, city) (`extend`'s placebo; a text's term:
    its words outside `known`, else the normalised text), and how many rows got other clicks."""

    def term(text: str) -> str:
        norm = normalize_text(text)
        new = sorted({w for w in WORD.findall(norm) if w not in known | STOP})
        return " ".join(new) if known and new else norm

    rng = np.random.default_rng(seed)
    log = log.copy()
    clicked = log["clicked"].map(list).tolist()
    bucket = log.index[log["policy"] == "explore"]
    groups = log.loc[bucket].groupby([log.loc[bucket, "query"].map(term), log.loc[bucket, "user_city"]])
    moved = 0
    for _, rows in groups.groups.items():
        rows = list(rows)
        positions = [[list(log.at[r, "shown"]).index(b) for b in clicked[r]] for r in rows]
        for r, pos in zip(rows, [positions[j] for j in rng.permutation(len(rows))]):
            shown = list(log.at[r, "shown"])
            new = [shown[p] for p in pos if p < len(shown)]
            moved += new != clicked[r]
            clicked[r] = new
    log["clicked"] = clicked
    return log, moved
