"""The parse browser: every test query with its gold parse and each system's parse in one SQLite file, which Datasette
opens as a searchable, sortable table (`datasette report/parses.sqlite`) and any SQLite client can query."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import sqlite_utils

# the numeric columns' SQLite types, given because a batch of NULLs would otherwise make them TEXT: Datasette passes a
# filter's value as text (`?frame_right=0`), and only a typed column compares text with numbers as numbers
NUMERIC = {"valid": int, "confidence": float, "intent_right": int, "frame_right": int, "ndcg@10": float}


def write_browser(
    path: Path,
    rows: list[dict],
    parses: dict[str, dict[str, dict | None]],
    confidences: dict[str, dict[str, float]],
    scores: pd.DataFrame,
) -> Path:
    """Write `path` (replacing it): table `parses`, one row per test query and parsing system (primary key id, system),
    indexed by query text and system, its text full-text searchable; a parse that did not validate has intent
    `invalid`. Returns the path."""
    score = scores.set_index(["system", "id"]).to_dict("index")  # (system, id) -> its row's scores
    records = []
    for r in rows:
        gold_slots = json.dumps(r["slots"], ensure_ascii=False, sort_keys=True)
        for system, preds in parses.items():
            pred = preds.get(r["id"])
            s = score.get((system, r["id"]), {})
            got = lambda col: None if pd.isna(s.get(col, float("nan"))) else float(s[col])  # noqa: E731
            records.append(
                {
                    "id": r["id"],
                    "text": r["text"],
                    "system": system,
                    "intent": pred["intent"] if pred else "invalid",
                    "slots": json.dumps(pred["slots"], ensure_ascii=False, sort_keys=True) if pred else None,
                    "valid": pred is not None,
                    "confidence": confidences.get(system, {}).get(r["id"]),
                    "intent_right": got("intent_accuracy") == 1.0,
                    "frame_right": got("frame_exact_match") == 1.0,
                    "ndcg@10": None if got("ndcg@10") is None else round(got("ndcg@10"), 4),
                    "gold_intent": r["intent"],
                    "gold_slots": gold_slots,
                    "traffic": r.get("traffic"),
                    "user_city": r.get("user_city"),
                    "effects": ", ".join(r.get("effects") or []),
                    "mechanisms": ", ".join(r.get("mechanisms") or []),
                }
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite_utils.Database(tmp)
    table = db["parses"].insert_all(records, pk=("id", "system"), columns=NUMERIC)
    table.create_index(["text"])
    table.create_index(["system", "frame_right"])
    table.enable_fts(["text"])  # Datasette's search box over the query text
    db.close()
    tmp.replace(path)  # a reader never sees half a file
    return path
