"""The parse browser: every test query with its gold parse and each system's parse in one SQLite file, which Datasette
opens as a searchable, sortable table (`datasette report/parses.sqlite`) and any SQLite client can query."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd

# each column's SQLite type: Datasette passes a filter's value as text (`?frame_right=0`), and only a typed column
# compares text with numbers as numbers
COLUMNS = {
    "id": "TEXT",
    "text": "TEXT",
    "system": "TEXT",
    "intent": "TEXT",
    "slots": "TEXT",
    "valid": "INTEGER",
    "confidence": "REAL",
    "intent_right": "INTEGER",
    "frame_right": "INTEGER",
    "ndcg@10": "REAL",
    "gold_intent": "TEXT",
    "gold_slots": "TEXT",
    "traffic": "TEXT",
    "user_city": "TEXT",
    "effects": "TEXT",
    "mechanisms": "TEXT",
}


def write_browser(
    path: Path,
    rows: list[dict],
    parses: dict[str, dict[str, dict | None]],
    confidences: dict[str, dict[str, float]],
    scores: pd.DataFrame,
) -> Path:
    """Write `path` (replacing it): table `parses`, one row per test query and parsing system, indexed by query text and
    system; a parse that did not validate has intent `invalid`. Returns the path."""
    score = scores.set_index(["system", "id"]).to_dict("index")  # (system, id) -> its row's scores
    records = []
    for r in rows:
        gold_slots = json.dumps(r["slots"], ensure_ascii=False, sort_keys=True)
        for system, preds in parses.items():
            pred = preds.get(r["id"])
            s = score.get((system, r["id"]), {})
            got = lambda col: None if pd.isna(s.get(col, float("nan"))) else float(s[col])  # noqa: E731
            records.append(
                (
                    r["id"],
                    r["text"],
                    system,
                    pred["intent"] if pred else "invalid",
                    json.dumps(pred["slots"], ensure_ascii=False, sort_keys=True) if pred else None,
                    pred is not None,
                    confidences.get(system, {}).get(r["id"]),
                    got("intent_accuracy") == 1.0,
                    got("frame_exact_match") == 1.0,
                    None if got("ndcg@10") is None else round(got("ndcg@10"), 4),
                    r["intent"],
                    gold_slots,
                    r.get("traffic"),
                    r.get("user_city"),
                    ", ".join(r.get("effects") or []),
                    ", ".join(r.get("mechanisms") or []),
                )
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with sqlite3.connect(tmp) as db:
        db.execute("CREATE TABLE parses (" + ", ".join(f'"{c}" {kind}' for c, kind in COLUMNS.items()) + ")")
        db.executemany(f"INSERT INTO parses VALUES ({', '.join('?' * len(COLUMNS))})", records)
        db.execute("CREATE INDEX parses_text ON parses (text)")
        db.execute("CREATE INDEX parses_system ON parses (system, frame_right)")
    tmp.replace(path)  # a reader never sees half a file
    return path
