"""The report's breakdowns beyond the stage table: paired differences against a baseline, calibration of the parse
confidence, intent confusion and the cache's coverage of the log against its size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from querytune.metrics import paired_bootstrap, paired_f1_difference
from querytune.schema import normalize_text

PAIRED = ("ndcg@10", "intent_accuracy", "slot_f1")  # the forest plot's metrics
COUNTS = ("tp", "fp", "fn")
DRAWS = 1000  # bootstrap resamples, as for the stage table


def paired_differences(
    scores: pd.DataFrame, baseline: str, systems: list[str], metrics=PAIRED, seed: int = 0
) -> dict[str, dict[str, dict]]:
    """System -> metric -> {"value", "low", "high", "n"}: the system minus `baseline` on the queries both were scored
    on, a percentile 95% bootstrap interval with the queries resampled together (paired), so that two systems that fail
    on the same hard queries are not judged by their separate, wider intervals."""
    out: dict[str, dict[str, dict]] = {}
    base = scores[scores["system"] == baseline].set_index("id")
    for name in systems:
        if name == baseline:
            continue
        other = scores[scores["system"] == name].set_index("id")
        entry = {}
        for metric in metrics:
            cols = list(COUNTS) if metric == "slot_f1" else [metric]
            if not all(c in base and c in other for c in cols):
                continue
            both = base[cols].merge(other[cols], left_index=True, right_index=True, suffixes=("_a", "_b")).dropna()
            if both.empty:
                continue
            side = lambda s: {k: both[f"{k}_{s}"].to_numpy(float) for k in cols}  # noqa: E731
            d = (
                paired_f1_difference(side("a"), side("b"), n=DRAWS, seed=seed)
                if metric == "slot_f1"
                else paired_bootstrap(side("a")[metric], side("b")[metric], n=DRAWS, seed=seed)
            )
            entry[metric] = {
                "value": round(d["mean"], 4),
                "low": round(d["low"], 4),
                "high": round(d["high"], 4),
                "n": len(both),
            }
        if entry:
            out[name] = entry
    return out


def calibration(records: list[dict], bins: int = 10) -> dict[str, Any] | None:
    """How well a stage's parse confidence predicts a right parse (the whole frame exact): per equal-width confidence
    bin its count, mean confidence and share right, and the expected calibration error (their gap, weighted by count).
    `records`: {"confidence", "right"} per test query; None when the stage saved no confidences."""
    pairs = [(r["confidence"], r["right"]) for r in records if r.get("confidence") is not None]
    if not pairs:
        return None
    conf, right = (np.array(x, dtype=float) for x in zip(*pairs))
    which = np.minimum((conf * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            c, r = float(conf[mask].mean()), float(right[mask].mean())
            table.append(
                {
                    "low": b / bins,
                    "high": (b + 1) / bins,
                    "n": int(mask.sum()),
                    "confidence": round(c, 4),
                    "right": round(r, 4),
                }
            )
            ece += mask.sum() / len(conf) * abs(c - r)
    return {"bins": table, "ece": round(float(ece), 4), "n": len(conf)}


def intent_confusion(golds: list[dict], preds: list[dict | None], intents: list[str]) -> dict[str, Any]:
    """Counts of gold intent (rows) against predicted intent (columns, with `invalid` for a parse that did not
    validate)."""
    cols = [*intents, "invalid"]
    counts = np.zeros((len(intents), len(cols)), dtype=int)
    for gold, pred in zip(golds, preds, strict=True):
        counts[intents.index(gold["intent"]), cols.index(pred["intent"]) if pred else -1] += 1
    return {"gold": intents, "predicted": cols, "counts": counts.tolist()}


def cache_coverage(log: Path, sizes: tuple[int, ...] = (10, 100, 1_000, 10_000, 100_000)) -> dict[str, Any] | None:
    """The share of the log's searches a cache of its N most frequent normalised queries answers, for each N in `sizes`
    (and all distinct queries); where the log has periods, also a cache filled from the earlier period's top N and
    asked by the later one, which is what a cache warmed yesterday sees today. None without a log."""
    if not log.is_file():
        return None
    import pyarrow.parquet as pq

    names = pq.read_schema(log).names
    frame = pq.read_table(log, columns=["query"] + (["period"] if "period" in names else [])).to_pandas()
    frame["key"] = frame["query"].map(lambda q: normalize_text(q) if isinstance(q, str) else "")

    def curve(warm: pd.Series, asked: pd.Series) -> list[dict[str, Any]]:
        ranked = warm.value_counts()
        asked_counts = asked.value_counts()
        points = []
        for n in sorted({*(s for s in sizes if s < len(ranked)), len(ranked)}):
            covered = asked_counts.reindex(ranked.index[:n]).fillna(0).sum()
            points.append({"top_n": int(n), "coverage": round(float(covered / len(asked)), 4)})
        return points

    out: dict[str, Any] = {
        "rows": len(frame),
        "distinct": int(frame["key"].nunique()),
        "curves": {"the whole log": curve(frame["key"], frame["key"])},
    }
    periods = list(dict.fromkeys(frame["period"])) if "period" in frame else []
    if len(periods) >= 2:
        early, late = frame[frame["period"] == periods[0]], frame[frame["period"] == periods[-1]]
        out["curves"][f"filled from {periods[0]}, asked by {periods[-1]}"] = curve(early["key"], late["key"])
    return out
