"""Per-row scores of every system on the test set: the one reader of saved predictions, the MiniLM peer, and each
system's parse outcome and retrieval metrics per query (what every figure of the report is computed from)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Callable

import pandas as pd

from querytune.evaluation.parse_eval import parse_scores
from querytune.metrics import ranking_metrics
from querytune.schema import ParseError, Schema

K = 10


def read_predictions(path: Path, rows: list[dict] | None = None) -> dict[str, dict]:
    """Row id -> the line `eval parse --predictions` wrote for it (id, text, gold, pred, valid, confidence, ...); with
    `rows`, every one of them must have its line."""
    preds = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            p = json.loads(line)
            preds[p["id"]] = p
    missing = [r["id"] for r in rows or [] if r["id"] not in preds]
    if missing:
        raise ValueError(
            f"{path}: no prediction for {len(missing)} test rows (first: {missing[0]}); predict the same test set"
        )
    return preds


def load_predictions(path: Path, rows: list[dict]) -> dict[str, dict | None]:
    """Row id -> the predicted parse, None where it was invalid."""
    return {i: p["pred"] if p.get("valid") else None for i, p in read_predictions(path, rows).items()}


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
        slots = {
            h: json.loads(v[i])
            for h, v in predicted.items()
            if h != "intent" and v[i] != "null" and (allowed is None or h in allowed)
        }
        slots = {k: v for k, v in slots.items() if v is not False}
        try:
            out[r["id"]] = schema.parse({"intent": intent, "slots": slots}).to_dict()
        except ParseError:
            out[r["id"]] = None
    return out


def score_systems(
    rows: list[dict], parses: dict[str, dict[str, dict | None]], searcher, schema: Schema, progress: Callable = iter
) -> tuple[pd.DataFrame, dict[str, dict[str, list[str]]]]:
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
                    ranked = (
                        searcher.search(schema.parse(pred), ctx, K, fallback_text=row["text"])
                        if pred
                        else searcher.raw(row["text"], ctx, K)
                    )
            rec = {"system": name, "id": row["id"], **parse_part}
            if ranked is not None:
                retrieved[name][row["id"]] = ranked
                rec |= ranking_metrics(ranked, row["relevance"], K)
            records.append(rec)
    return pd.DataFrame.from_records(records), retrieved
