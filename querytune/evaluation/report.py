"""The relevance evaluation report: every stage side by side, with bootstrap intervals, slices and plots.

    querytune eval report --workspace workspace

A workspace is what `make demo` writes (every part can live elsewhere and be named by option):

    world/      test.jsonl (gold parses, graded relevance, traffic, phrasing), seed.jsonl, stats.json
    index/      the FAISS index of the catalog
    models/<stage>/   predictions_test.jsonl from `querytune eval parse --predictions`, steps.jsonl, summary.json
    labels/     summary.json of `querytune label` / `cache warm` (optional)
    eval/       serving.json of `python -m querytune.evaluation.loadtest` (optional); the report's per-row scores
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

from querytune.evaluation import breakdowns
from querytune.evaluation.browser import write_browser
from querytune.evaluation.parse_eval import parse_metrics
from querytune.evaluation.report_html import LIST_SLICES, PARSE, RETRIEVAL, SLICES, barely_trained_note, write_html
from querytune.evaluation.scores import K, peer_predictions, read_predictions, score_systems
from querytune.metrics import bootstrap, micro_f1
from querytune.schema_file import load_schema

MIN_SLICE = 30  # fewer queries than this: the slice says so rather than showing a number
STAGE_ORDER = ("sft", "self_train", "rft", "dpo", "grpo")


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
        """Model folders with saved test predictions: sft, self_train, rft, dpo, grpo first,
        then any other in name order."""
        found = {p.name: p for p in sorted(self.models.glob("*")) if (p / "predictions_test.jsonl").is_file()}
        return {
            name: found[name]
            for name in sorted(found, key=lambda n: (STAGE_ORDER.index(n) if n in STAGE_ORDER else 99, n))
        }


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


def slice_table(
    scores: pd.DataFrame,
    rows: list[dict],
    systems: list[str],
    metrics=("ndcg@10", "intent_accuracy", "slot_f1"),
    min_n: int = MIN_SLICE,
) -> dict[str, dict[str, Any]]:
    """Per slice key and value: n and each system's metrics, or `too_few` where n < min_n."""
    frame = pd.DataFrame({"id": [r["id"] for r in rows], **{k: [r.get(k) for r in rows] for k in SLICES}})
    out: dict[str, dict[str, Any]] = {}
    for key in SLICES:
        if frame[key].isna().all():
            continue
        if key in LIST_SLICES:
            groups = {
                e: {r["id"] for r in rows if e in (r.get(key) or [])}
                for e in sorted({e for r in rows for e in r.get(key) or []})
            }
            groups["none"] = {r["id"] for r in rows if not r.get(key)}
        else:
            groups = {
                str(v): set(frame.loc[frame[key] == v, "id"]) for v in sorted(frame[key].dropna().unique(), key=str)
            }
        out[key] = {}
        for value, ids in groups.items():
            entry: dict[str, Any] = {"n": len(ids)}
            if len(ids) < min_n:
                entry["too_few"] = True
            else:
                sub = scores[scores["id"].isin(ids)]
                entry["systems"] = {
                    name: {m: iv for m in metrics if (iv := _metric(sub[sub["system"] == name], m))} for name in systems
                }
            out[key][value] = entry
    return out


def _metric(s: pd.DataFrame, metric: str) -> dict | None:
    column = "tp" if metric == "slot_f1" else metric
    if column not in s or s[column].isna().all():
        return None
    return metric_interval(s, metric)


def disagreements(
    scores: pd.DataFrame,
    rows: list[dict],
    parses: dict[str, dict],
    retrieved: dict[str, dict],
    names: dict[str, str],
    stages: list[str],
    top: int = 12,
) -> list[dict]:
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
        out.append(
            {
                "id": qid,
                "text": r["text"],
                "gold": {"intent": r["intent"], "slots": r["slots"]},
                "spread": round(float(gap), 4),
                "stages": {
                    s: {
                        "parse": parses[s][qid],
                        "ndcg@10": round(float(ndcg.at[qid, s]), 4),
                        "top3": [names.get(b, b) for b in retrieved[s].get(qid, [])[:3]],
                    }
                    for s in stages
                },
            }
        )
    return out


def training_curves(stages: dict[str, Path]) -> dict[str, list[dict]]:
    curves = {}
    for name, folder in stages.items():
        path = folder / "steps.jsonl"
        if path.is_file():
            curves[name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return curves


MIN_STEPS = 10  # a stage with fewer optimizer steps than this has barely moved from where it started


def barely_trained(stages: dict[str, Path]) -> list[str]:
    """Why these models' figures say little about the method, one reason per stage (none: they are trained): an SFT
    that saw less than one pass over its labeled rows, a stage with fewer than MIN_STEPS optimizer steps."""
    why = []
    for name, folder in stages.items():
        summary, config = (folder / "summary.json"), (folder / "train_config.json")
        if not summary.is_file():
            continue
        s = json.loads(summary.read_text())
        steps = s.get("steps")
        batch = json.loads(config.read_text()).get("batch_size") if config.is_file() else None
        if s.get("stage") == "sft" and steps and batch and s.get("examples") and steps * batch < s["examples"]:
            why.append(
                f"{name}: {steps} steps x {batch} = {steps * batch:,} examples, "
                f"{steps * batch / s['examples']:.2f} of one pass over its {s['examples']:,} labeled rows"
            )
        elif steps is not None and steps < MIN_STEPS:
            why.append(f"{name}: {steps} optimizer step{'s' * (steps != 1)}")
    return why


def side_figures(ws: Workspace) -> dict[str, Any]:
    """Labeling, serving and real-data figures found in the workspace (each optional)."""
    found: dict[str, Any] = {}
    for path in sorted(ws.labels.glob("**/summary.json")) if ws.labels.is_dir() else []:
        s = json.loads(path.read_text())
        found.setdefault("labeling", {})[str(path.parent.relative_to(ws.root))] = {
            k: s.get(k)
            for k in (
                "rows",
                "distinct",
                "rejected",
                "labeled_now",
                "seconds",
                "queries_per_s",
                "rows_per_s",
                "backend",
                "model_version",
            )
        }
    if (ws.eval / "serving.json").is_file():
        found["serving"] = json.loads((ws.eval / "serving.json").read_text())
    if (ws.eval / "warm.json").is_file():
        found["warm"] = json.loads((ws.eval / "warm.json").read_text())
    for path in sorted(ws.real.glob("*/parse_*.json")) if ws.real.is_dir() else []:
        m = json.loads(path.read_text())
        found.setdefault("real", {})[f"{path.parent.name} ({path.stem.removeprefix('parse_')})"] = {
            k: m.get(k)
            for k in ("n", "intent_accuracy", "slot_f1", "frame_exact_match", "validity", "schema_version", "data")
        }
    return found


def build_report(ws: Workspace, say=print, progress: Callable = iter, baseline: str | None = None) -> dict[str, Any]:
    """Score every system and write report/{metrics.json, summary.md, index.html, parses.sqlite}; returns the metrics.
    `baseline`: the system every other is compared with, paired (default: self-training where the workspace has it,
    the fair control of every reward stage; else the first model stage)."""
    from querytune.evaluation.retrieval_eval import load_rows
    from querytune.search import Searcher

    test = ws.world / "test.jsonl"
    if not test.is_file():
        raise FileNotFoundError(f"{test}: not found (run `querytune world make --out {ws.world}`)")
    rows = load_rows(test)
    stages = ws.stages()
    if not stages:
        raise FileNotFoundError(
            f"{ws.models}: no model folder with predictions_test.jsonl (run `querytune eval parse --predictions`)"
        )
    schema = load_schema(next(iter(stages.values())) / "schema.yaml")
    searcher = Searcher(ws.index, schema)
    parses: dict[str, dict] = {}
    seed_path = ws.world / "seed.jsonl"
    if seed_path.is_file():
        say("peer: MiniLM embeddings + logistic regression heads, trained on the seed set")
        parses["peer"] = peer_predictions(load_rows(seed_path), rows, schema, searcher.embedder)
    confidences: dict[str, dict[str, float]] = {}
    for name, folder in stages.items():
        saved = read_predictions(folder / "predictions_test.jsonl", rows)
        parses[name] = {i: p["pred"] if p.get("valid") else None for i, p in saved.items()}
        confidences[name] = {i: p["confidence"] for i, p in saved.items() if p.get("confidence") is not None}
    systems = ["raw", "bm25", *parses, "oracle"]
    baseline = baseline or ("self_train" if "self_train" in stages else next(iter(stages)))
    if baseline not in systems:
        raise ValueError(f"baseline {baseline!r} is not a system of this report ({', '.join(systems)})")
    scores, retrieved = score_systems(rows, parses, searcher, schema, progress)
    ws.eval.mkdir(parents=True, exist_ok=True)
    scores.to_parquet(ws.eval / "per_row.parquet")
    names = dict(zip(searcher.catalog["business_id"], searcher.catalog["name"]))
    table = stage_table(scores, systems)
    golds = [{"intent": r["intent"], "slots": r["slots"]} for r in rows]
    frame_right = scores.set_index(["system", "id"])["frame_exact_match"]
    metrics = {
        "stages": {name: {m: iv["value"] for m, iv in entry.items() if iv} for name, entry in table.items()},
        "intervals": table,
        "baseline": baseline,
        "paired": breakdowns.paired_differences(scores, baseline, systems),
        "slot_f1_by_slot": {
            name: parse_metrics(golds, [parses[name][r["id"]] for r in rows])["per_slot"] for name in parses
        },
        "intent_confusion": {
            name: breakdowns.intent_confusion(golds, [parses[name][r["id"]] for r in rows], list(schema.intents))
            for name in stages
        },
        "calibration": {
            name: breakdowns.calibration(
                [{"confidence": confidences[name].get(r["id"]), "right": frame_right[(name, r["id"])]} for r in rows]
            )
            for name in stages
        },
        "cache_coverage": breakdowns.cache_coverage(ws.world / "log.parquet"),
        "slices": slice_table(scores, rows, systems),
        "disagreements": disagreements(scores, rows, parses, retrieved, names, list(stages)),
        "training": {name: _curve_summary(c) for name, c in training_curves(stages).items()},
        "barely_trained": barely_trained(stages),
        **side_figures(ws),
        "meta": {
            "test_rows": len(rows),
            "graded_rows": sum(bool(r.get("relevance")) for r in rows),
            "k": K,
            "bootstrap": {"draws": 1000, "interval": "percentile 95%", "unit": "test query"},
            "min_slice": MIN_SLICE,
            "schema_version": schema.version,
            "index": searcher.meta.get("model", searcher.meta),
            "models": {name: str(folder) for name, folder in stages.items()},
            "created": datetime.now().isoformat(timespec="seconds"),
        },
    }
    ws.report.mkdir(parents=True, exist_ok=True)
    browser = write_browser(ws.report / "parses.sqlite", rows, parses, confidences, scores)
    metrics["browser"] = str(browser.relative_to(ws.root)) if browser.is_relative_to(ws.root) else str(browser)
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
    tail = curve[-max(1, len(curve) // 10) :]
    return {
        "steps": curve[-1]["step"],
        **{f"{k}_end": round(float(np.mean([c[k] for c in tail if k in c])), 4) for k in keys},
    }


def fmt(iv: dict | None) -> str:
    return "" if not iv else f"{iv['value']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def signed(iv: dict | None) -> str:
    return "" if not iv else f"{iv['value']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]"


def summary_markdown(metrics: dict[str, Any]) -> str:
    cols = RETRIEVAL + PARSE
    note = barely_trained_note(metrics)
    lines = [
        "# querytune relevance report",
        "",
        *([f"> **{note}**", ""] if note else []),
        f"{metrics['meta']['test_rows']} test queries ({metrics['meta']['graded_rows']} with graded relevance); "
        "95% percentile bootstrap intervals over queries.",
        "",
        "| system | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, entry in metrics["intervals"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(entry.get(c)) for c in cols) + " |")
    if metrics.get("paired"):
        paired = metrics["paired"]
        lines += [
            "",
            f"## Difference from {metrics['baseline']} (paired 95% bootstrap intervals)",
            "",
            "| system | " + " | ".join(breakdowns.PAIRED) + " |",
            "|---|" + "---|" * len(breakdowns.PAIRED),
        ]
        for name, entry in paired.items():
            lines.append(f"| {name} | " + " | ".join(signed(entry.get(c)) for c in breakdowns.PAIRED) + " |")
    for key, values in metrics["slices"].items():
        systems = list(metrics["intervals"])
        lines += [
            "",
            f"## NDCG@10 by {SLICES[key]}",
            "",
            "| slice | n | " + " | ".join(systems) + " |",
            "|---|---|" + "---|" * len(systems),
        ]
        for value, entry in values.items():
            if entry.get("too_few"):
                cells = [f"too few queries (n={entry['n']})"] + [""] * (len(systems) - 1)
            else:
                cells = [
                    f"{entry['systems'][s]['ndcg@10']['value']:.3f}" if "ndcg@10" in entry["systems"].get(s, {}) else ""
                    for s in systems
                ]
            lines.append(f"| {value} | {entry['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
