"""The relevance evaluation report: every stage side by side, with bootstrap intervals, slices and plots.

    querytune eval report --workspace workspace

A workspace is what `make demo` writes (every part can live elsewhere and be named by option):

    world/      test.jsonl (gold parses, graded relevance, traffic, phrasing), seed.jsonl, stats.json
    index/      the FAISS index of the catalog
    models/<stage>/   predictions_test.jsonl from `querytune eval parse --predictions`, steps.jsonl, summary.json
    labels/     summary.json of `querytune label` / `cache warm` (optional)
    eval/       serving.json of `serving/loadtest.py` (optional); the report's per-row scores
    real/<name>/parse_*.json   a real-data check on another schema (optional)
    report/     index.html (self-contained), metrics.json, summary.md

Systems: `raw` and `bm25` (the query text, no understanding), `peer` (frozen MiniLM embeddings + one logistic
regression per head: intent and every categorical or boolean slot, trained on the seed set), each model stage
(from its saved predictions: nothing is parsed again) and `oracle` (the gold parse: the ceiling of this search).
Every figure comes with a percentile bootstrap 95% interval over test queries (`bootstrap`); a slice with fewer
than `MIN_SLICE` queries shows its count instead of a number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from querytune.evaluation.parse_eval import slot_pairs
from querytune.evaluation.report_html import LIST_SLICES, PARSE, RETRIEVAL, SLICES, write_html
from querytune.metrics import bootstrap, micro_f1, ranking_metrics
from querytune.schema import ParseError, Schema, load_schema

K = 10
MIN_SLICE = 30  # fewer queries than this: the slice says so rather than showing a number
STAGE_ORDER = ("sft", "dpo", "grpo")


@dataclass(frozen=True)
class Workspace:
    """The folders of a workspace; `Workspace.at(root)` puts each under `root`, unless named elsewhere."""

    root: Path
    world: Path
    index: Path
    models: Path
    labels: Path
    eval: Path
    report: Path
    real: Path

    @classmethod
    def at(cls, root: str | Path, **parts: str | Path | None) -> Workspace:
        root = Path(root)
        names = ("world", "index", "models", "labels", "eval", "report", "real")
        return cls(root, **{n: Path(parts[n]) if parts.get(n) else root / n for n in names})

    def stages(self) -> dict[str, Path]:
        """Model folders with saved test predictions: sft, dpo, grpo first, then any other in name order."""
        found = {p.name: p for p in sorted(self.models.glob("*")) if (p / "predictions_test.jsonl").is_file()}
        return {name: found[name] for name in sorted(found, key=lambda n: (STAGE_ORDER.index(n) if n in STAGE_ORDER else 99, n))}


def _mean(name: str):
    return lambda c, axis: c[name].mean(axis=axis)


def _f1(c: dict[str, np.ndarray], axis: int) -> np.ndarray:
    return micro_f1(*(c[k].sum(axis=axis) for k in ("tp", "fp", "fn")))


def metric_interval(scores: pd.DataFrame, metric: str, seed: int = 0) -> dict[str, float] | None:
    """{"value", "low", "high", "n"} of one metric over per-row scores (NaN rows left out); None if no rows."""
    if metric == "slot_f1":
        cols = scores[["tp", "fp", "fn"]].dropna()
        stat, columns = _f1, {k: cols[k].to_numpy(float) for k in ("tp", "fp", "fn")}
    else:
        col = scores[metric].dropna()
        stat, columns = _mean(metric), {metric: col.to_numpy(float)}
    n = len(next(iter(columns.values())))
    if n == 0:
        return None
    value, low, high = bootstrap(stat, columns, seed=seed)
    return {"value": round(value, 4), "low": round(low, 4), "high": round(high, 4), "n": n}


# -- per-row scores -----------------------------------------------------------------------------------------
def parse_scores(gold: dict, pred: dict | None) -> dict[str, float]:
    """One row's parse outcome: intent right, frame right, valid, and its slot true/false positives/negatives."""
    g, p = slot_pairs(gold["slots"]), slot_pairs(pred["slots"]) if pred else set()
    intent_ok = bool(pred) and pred["intent"] == gold["intent"]
    return {"intent_accuracy": float(intent_ok), "frame_exact_match": float(intent_ok and g == p), "validity": float(pred is not None),
            "tp": float(len(g & p)), "fp": float(len(p - g)), "fn": float(len(g - p))}


def load_predictions(path: Path, rows: list[dict]) -> dict[str, dict | None]:
    preds = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            p = json.loads(line)
            preds[p["id"]] = p["pred"] if p.get("valid") else None
    missing = [r["id"] for r in rows if r["id"] not in preds]
    if missing:
        raise ValueError(f"{path}: no prediction for {len(missing)} test rows (first: {missing[0]}); predict the same test set")
    return preds


def peer_predictions(seed_rows: list[dict], rows: list[dict], schema: Schema, embedder) -> dict[str, dict]:
    """The cheap peer: frozen sentence embeddings + logistic regression, one head for the intent and one per
    categorical or boolean slot (absent is a class), trained on the seed set. Free-text and number slots stay empty."""
    from sklearn.linear_model import LogisticRegression

    x_train = embedder.encode([r["text"] for r in seed_rows])
    x_test = embedder.encode([r["text"] for r in rows])
    heads = {"intent": [r["intent"] for r in seed_rows]}
    for name, slot in schema.slots.items():
        if slot.type in ("categorical", "boolean"):
            heads[name] = [json.dumps(r["slots"].get(name)) for r in seed_rows]
    predicted = {}
    for head, labels in heads.items():
        if len(set(labels)) == 1:
            predicted[head] = [labels[0]] * len(rows)
            continue
        clf = LogisticRegression(max_iter=2000, C=4.0).fit(x_train, labels)
        predicted[head] = list(clf.predict(x_test))
    out = {}
    for i, r in enumerate(rows):
        intent = predicted["intent"][i]
        allowed = schema.intents[intent].slots
        slots = {h: json.loads(v[i]) for h, v in predicted.items() if h != "intent" and v[i] != "null"
                 and (allowed is None or h in allowed)}
        slots = {k: v for k, v in slots.items() if v is not False}
        try:
            out[r["id"]] = schema.parse({"intent": intent, "slots": slots}).to_dict()
        except ParseError:
            out[r["id"]] = None
    return out


def score_systems(rows: list[dict], parses: dict[str, dict[str, dict | None]], searcher, schema: Schema,
                  progress: Callable = iter) -> tuple[pd.DataFrame, dict[str, dict[str, list[str]]]]:
    """Per-row scores of every system (long format: system, id, retrieval and parse columns) and the top-k each
    system retrieved. `parses`: system name -> row id -> canonical parse (None: invalid, searched as raw text)."""
    from querytune.search import Context

    records, retrieved = [], {name: {} for name in ["raw", "bm25", *parses, "oracle"]}
    for row in progress(rows):
        gold = {"intent": row["intent"], "slots": row["slots"]}
        ctx = Context(row["user_city"], datetime.fromisoformat(row["timestamp"]))
        graded = bool(row.get("relevance"))
        for name in retrieved:
            if name in ("raw", "bm25"):
                ranked = getattr(searcher, name)(row["text"], ctx, K) if graded else None
                parse_part: dict[str, float] = {}
            else:
                pred = gold if name == "oracle" else parses[name][row["id"]]
                parse_part = parse_scores(gold, pred)
                ranked = None
                if graded:
                    ranked = (searcher.search(schema.parse(pred), ctx, K, fallback_text=row["text"]) if pred
                              else searcher.raw(row["text"], ctx, K))
            rec = {"system": name, "id": row["id"], **parse_part}
            if ranked is not None:
                retrieved[name][row["id"]] = ranked
                rec |= ranking_metrics(ranked, row["relevance"], K)
            records.append(rec)
    return pd.DataFrame.from_records(records), retrieved


# -- the report's numbers -----------------------------------------------------------------------------------
def stage_table(scores: pd.DataFrame, systems: list[str]) -> dict[str, dict[str, Any]]:
    """Every metric of every system with its interval; parse metrics only for systems that parse."""
    table = {}
    for name in systems:
        s = scores[scores["system"] == name]
        entry = {}
        for metric in RETRIEVAL + PARSE:
            if iv := _metric(s, metric):
                entry[metric] = iv
        table[name] = entry
    return table


def slice_table(scores: pd.DataFrame, rows: list[dict], systems: list[str], metrics=("ndcg@10", "intent_accuracy", "slot_f1"),
                min_n: int = MIN_SLICE) -> dict[str, dict[str, Any]]:
    """Per slice key and value: n and each system's metrics, or `too_few` where n < min_n."""
    frame = pd.DataFrame({"id": [r["id"] for r in rows], **{k: [r.get(k) for r in rows] for k in SLICES}})
    out: dict[str, dict[str, Any]] = {}
    for key in SLICES:
        if frame[key].isna().all():
            continue
        if key in LIST_SLICES:
            groups = {e: {r["id"] for r in rows if e in (r.get(key) or [])} for e in sorted({e for r in rows for e in r.get(key) or []})}
            groups["none"] = {r["id"] for r in rows if not r.get(key)}
        else:
            groups = {str(v): set(frame.loc[frame[key] == v, "id"]) for v in sorted(frame[key].dropna().unique(), key=str)}
        out[key] = {}
        for value, ids in groups.items():
            entry: dict[str, Any] = {"n": len(ids)}
            if len(ids) < min_n:
                entry["too_few"] = True
            else:
                sub = scores[scores["id"].isin(ids)]
                entry["systems"] = {name: {m: iv for m in metrics if (iv := _metric(sub[sub["system"] == name], m))}
                                    for name in systems}
            out[key][value] = entry
    return out


def _metric(s: pd.DataFrame, metric: str) -> dict | None:
    column = "tp" if metric == "slot_f1" else metric
    if column not in s or s[column].isna().all():
        return None
    return metric_interval(s, metric)


def disagreements(scores: pd.DataFrame, rows: list[dict], parses: dict[str, dict], retrieved: dict[str, dict],
                  names: dict[str, str], stages: list[str], top: int = 12) -> list[dict]:
    """The test queries whose NDCG@10 differs most between model stages, with each stage's parse and top 3."""
    if len(stages) < 2:
        return []
    ndcg = scores[scores["system"].isin(stages)].pivot(index="id", columns="system", values="ndcg@10").dropna()
    spread = (ndcg.max(axis=1) - ndcg.min(axis=1)).sort_values(ascending=False, kind="stable")
    by_id = {r["id"]: r for r in rows}
    out = []
    for qid, gap in spread.head(top).items():
        if gap <= 0:
            break
        r = by_id[qid]
        out.append({"id": qid, "text": r["text"], "gold": {"intent": r["intent"], "slots": r["slots"]}, "spread": round(float(gap), 4),
                    "stages": {s: {"parse": parses[s][qid], "ndcg@10": round(float(ndcg.at[qid, s]), 4),
                                   "top3": [names.get(b, b) for b in retrieved[s].get(qid, [])[:3]]} for s in stages}})
    return out


def training_curves(stages: dict[str, Path]) -> dict[str, list[dict]]:
    curves = {}
    for name, folder in stages.items():
        path = folder / "steps.jsonl"
        if path.is_file():
            curves[name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return curves


def side_figures(ws: Workspace) -> dict[str, Any]:
    """Labeling, serving and real-data figures found in the workspace (each optional)."""
    found: dict[str, Any] = {}
    for path in sorted(ws.labels.glob("**/summary.json")) if ws.labels.is_dir() else []:
        s = json.loads(path.read_text())
        found.setdefault("labeling", {})[str(path.parent.relative_to(ws.root))] = {
            k: s.get(k) for k in ("rows", "distinct", "rejected", "labeled_now", "seconds", "queries_per_s", "rows_per_s", "backend", "model_version")}
    if (ws.eval / "serving.json").is_file():
        found["serving"] = json.loads((ws.eval / "serving.json").read_text())
    if (ws.eval / "warm.json").is_file():
        found["warm"] = json.loads((ws.eval / "warm.json").read_text())
    for path in sorted(ws.real.glob("*/parse_*.json")) if ws.real.is_dir() else []:
        m = json.loads(path.read_text())
        found.setdefault("real", {})[f"{path.parent.name} ({path.stem.removeprefix('parse_')})"] = {
            k: m.get(k) for k in ("n", "intent_accuracy", "slot_f1", "frame_exact_match", "validity", "schema_version", "data")}
    return found


def build_report(ws: Workspace, say=print, progress: Callable = iter) -> dict[str, Any]:
    """Score every system and write report/{metrics.json, summary.md, index.html}; returns the metrics."""
    from querytune.evaluation.retrieval_eval import load_rows
    from querytune.search import Searcher

    test = ws.world / "test.jsonl"
    if not test.is_file():
        raise FileNotFoundError(f"{test}: not found (run `querytune world make --out {ws.world}`)")
    rows = load_rows(test)
    stages = ws.stages()
    if not stages:
        raise FileNotFoundError(f"{ws.models}: no model folder with predictions_test.jsonl (run `querytune eval parse --predictions`)")
    schema = load_schema(next(iter(stages.values())) / "schema.yaml")
    searcher = Searcher(ws.index, schema)
    parses: dict[str, dict] = {}
    seed_path = ws.world / "seed.jsonl"
    if seed_path.is_file():
        say("peer: MiniLM embeddings + logistic regression heads, trained on the seed set")
        parses["peer"] = peer_predictions(load_rows(seed_path), rows, schema, searcher.embedder)
    for name, folder in stages.items():
        parses[name] = load_predictions(folder / "predictions_test.jsonl", rows)
    scores, retrieved = score_systems(rows, parses, searcher, schema, progress)
    systems = ["raw", "bm25", *parses, "oracle"]
    ws.eval.mkdir(parents=True, exist_ok=True)
    scores.to_parquet(ws.eval / "per_row.parquet")
    names = dict(zip(searcher.catalog["business_id"], searcher.catalog["name"]))
    table = stage_table(scores, systems)
    metrics = {"stages": {name: {m: iv["value"] for m, iv in entry.items() if iv} for name, entry in table.items()},
               "intervals": table,
               "slices": slice_table(scores, rows, systems),
               "disagreements": disagreements(scores, rows, parses, retrieved, names, list(stages)),
               "training": {name: _curve_summary(c) for name, c in training_curves(stages).items()},
               **side_figures(ws),
               "meta": {"test_rows": len(rows), "graded_rows": sum(bool(r.get("relevance")) for r in rows), "k": K,
                        "bootstrap": {"draws": 1000, "interval": "percentile 95%", "unit": "test query"}, "min_slice": MIN_SLICE,
                        "schema_version": schema.version, "index": searcher.meta.get("model", searcher.meta),
                        "models": {name: str(folder) for name, folder in stages.items()},
                        "created": datetime.now().isoformat(timespec="seconds")}}
    ws.report.mkdir(parents=True, exist_ok=True)
    (ws.report / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
    (ws.report / "summary.md").write_text(summary_markdown(metrics))
    write_html(ws.report / "index.html", metrics, training_curves(stages))
    return metrics


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(type(o))


def _curve_summary(curve: list[dict]) -> dict[str, Any]:
    if not curve:
        return {}
    keys = [k for k in curve[-1] if k not in ("step", "seconds", "lr", "tokens_per_s")]
    tail = curve[-max(1, len(curve) // 10):]
    return {"steps": curve[-1]["step"], **{f"{k}_end": round(float(np.mean([c[k] for c in tail if k in c])), 4) for k in keys}}


def fmt(iv: dict | None) -> str:
    return "" if not iv else f"{iv['value']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def summary_markdown(metrics: dict[str, Any]) -> str:
    cols = RETRIEVAL + PARSE
    lines = ["# querytune relevance report", "",
             f"{metrics['meta']['test_rows']} test queries ({metrics['meta']['graded_rows']} with graded relevance); "
             "95% percentile bootstrap intervals over queries.", "",
             "| system | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, entry in metrics["intervals"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(entry.get(c)) for c in cols) + " |")
    for key, values in metrics["slices"].items():
        systems = list(metrics["intervals"])
        lines += ["", f"## NDCG@10 by {SLICES[key]}", "", "| slice | n | " + " | ".join(systems) + " |", "|---|---|" + "---|" * len(systems)]
        for value, entry in values.items():
            if entry.get("too_few"):
                cells = [f"too few queries (n={entry['n']})"] + [""] * (len(systems) - 1)
            else:
                cells = [f"{entry['systems'][s]['ndcg@10']['value']:.3f}" if "ndcg@10" in entry["systems"].get(s, {}) else "" for s in systems]
            lines.append(f"| {value} | {entry['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
