"""Retrieval evaluation: every system's top-k on the held-out rows, scored against hidden-need relevance.

    querytune eval retrieval --world runs/world --index runs/index --out runs/retrieval.json [--split test]

Systems: `raw` (query text embedded, user's city), `bm25` (lexical, user's city) and `oracle` (the structured
search from the gold parse: the ceiling that query understanding can reach with this search). Rows without
relevance (out-of-scope queries) are left out of retrieval metrics. Tune on `dev`, report on `test`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import numpy as np

from querytune.metrics import ranking_metrics
from querytune.schema import Schema
from querytune.search import Context, Searcher

System = Callable[[dict, Context], list[str]]


def load_rows(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def baseline_systems(searcher: Searcher, schema: Schema, k: int) -> dict[str, System]:
    return {
        "raw": lambda row, ctx: searcher.raw(row["text"], ctx, k),
        "bm25": lambda row, ctx: searcher.bm25(row["text"], ctx, k),
        "oracle": lambda row, ctx: searcher.search(
            schema.parse({"intent": row["intent"], "slots": row["slots"]}), ctx, k, fallback_text=row["text"]
        ),
    }


def evaluate(
    rows: list[dict], systems: dict[str, System], k: int = 10, progress: Callable[[Iterable], Iterable] = iter
) -> dict:
    """Mean metrics per system, per-row NDCG (for paired comparisons) and slices by traffic and intent."""
    rows = [r for r in rows if r.get("relevance")]
    per_row: dict[str, list[dict]] = {name: [] for name in systems}
    for row in progress(rows):
        ctx = Context(row["user_city"], datetime.fromisoformat(row["timestamp"]))
        for name, system in systems.items():
            per_row[name].append(ranking_metrics(system(row, ctx), row["relevance"], k))
    report: dict = {name: _mean(m) for name, m in per_row.items()}
    report["slices"] = {}
    for key in ("traffic", "intent", "phrasing_in_seed"):
        values = sorted({str(r.get(key)) for r in rows})
        report["slices"][key] = {
            v: {
                "n": sum(str(r.get(key)) == v for r in rows),
                **{name: _mean([m for r, m in zip(rows, per_row[name]) if str(r.get(key)) == v]) for name in systems},
            }
            for v in values
        }
    report["per_row"] = {
        "id": [r["id"] for r in rows],
        **{name: [m[f"ndcg@{k}"] for m in per_row[name]] for name in systems},
    }
    report["per_row"]["phrasing_in_seed"] = [r.get("phrasing_in_seed") for r in rows]
    report["meta"] = {"n": len(rows), "k": k}
    return report


def _mean(metrics: list[dict]) -> dict[str, float]:
    if not metrics:
        return {}
    return {key: round(float(np.mean([m[key] for m in metrics])), 4) for key in metrics[0]}


def compare_to(report: dict, baseline: str, k: int = 10, rows: list[dict] | None = None) -> dict:
    """Every system against `baseline` on NDCG@k, paired by query: mean difference with a bootstrap 95%
    interval, and the mean difference on rows whose phrasing the seed covers and on the rest."""
    from querytune.metrics import paired_bootstrap

    per_row = report["per_row"]
    covered = per_row.get("phrasing_in_seed") or [None] * len(per_row["id"])
    out = {"baseline": baseline, "metric": f"ndcg@{k}", "systems": {}}
    base = np.asarray(per_row[baseline])
    for name, values in per_row.items():
        if name in ("id", "phrasing_in_seed", baseline):
            continue
        diff = np.asarray(values) - base
        entry = {key: round(v, 4) for key, v in paired_bootstrap(base, values).items()}
        for part, want in (("covered", True), ("uncovered", False)):
            mask = np.array([c is want for c in covered])
            entry[part] = round(float(diff[mask].mean()), 4) if mask.any() else float("nan")
        out["systems"][name] = entry
    return out
