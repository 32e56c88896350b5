"""A world folder from a user's own files: labeled seed rows, a search log with what was shown and clicked, and the
business catalogue, each checked row by row, so that the index, every reward stage and the miner read them as they
read the simulated world's (docs/data.md, "Your own search log and catalogue").

    querytune data world --seed labels.jsonl --log searches.csv --catalog businesses.csv --out runs/mine [--schema S]

Writes OUT/seed.jsonl, OUT/log.parquet (every row `early`: the part training reads), OUT/catalog.parquet (then
`querytune index build --world OUT`) and OUT/rejects.jsonl: every row of the three files is in the folder or in the
rejects, with its file, line and reason.

The search log, one row per search (JSONL, CSV or Parquet; in CSV a list is a JSON string):
`query`; `timestamp` (ISO local time: resolves "open now"); `user_city`; `shown` (business ids in display order);
`clicked` (ids, a subset of `shown`); optional `display_p` (per shown business, the logging policy's probability of
showing it at its position: where some are below 0.5, clicks on them fit the position bias, else 1/rank is assumed;
`querytune.train.clicks`), `policy` (`explore` for an exploration bucket's rows: kept out of that fit) and `query_id`.

The catalogue, one row per business: `business_id`, `name`, `city`; optional `category`, `cuisine`, `neighborhood`
(the schema's values, any case), `price_level` (1-4), `rating` (0-5), `hours` (JSON: weekday "0" = Monday ->
[open, close] minutes after midnight; missing: open every day, all day), boolean attribute columns (`kid_friendly`,
...: the schema's `attribute:` filters) and `text` (what is embedded; default: name, category, cuisine,
neighbourhood and city).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from querytune.labeled import LabeledDataError, Reject, load_labeled, read_records, write_labeled
from querytune.schema import ParseError, Schema, normalize_text

LOG_REQUIRED = ("query", "timestamp", "user_city", "shown", "clicked")
CATALOG_REQUIRED = ("business_id", "name", "city")
ALWAYS_OPEN = json.dumps({str(d): [0, 1440] for d in range(7)})


def _list(value: Any, field: str) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{field}: not a JSON list ({e.msg})") from None
    if hasattr(value, "tolist"):  # a Parquet list cell
        value = value.tolist()
    if not isinstance(value, list):
        raise ValueError(f"{field}: expected a list, got {type(value).__name__}")
    return value


def _log_row(rec: Any) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object, got {type(rec).__name__}")
    query = rec.get("query")
    if not isinstance(query, str) or not normalize_text(query):
        raise ValueError("query: missing or empty")
    try:
        ts = pd.Timestamp(rec.get("timestamp"))
    except (ValueError, TypeError):
        raise ValueError(f"timestamp: {rec.get('timestamp')!r} is not an ISO time") from None
    if pd.isna(ts):
        raise ValueError("timestamp: missing")
    city = rec.get("user_city")
    if not isinstance(city, str) or not city.strip():
        raise ValueError("user_city: missing or empty")
    shown = [str(b) for b in _list(rec.get("shown"), "shown")]
    clicked = [str(b) for b in _list(rec.get("clicked"), "clicked")]
    stray = [b for b in clicked if b not in shown]
    if stray:
        raise ValueError(f"clicked: {stray[0]!r} was not shown")
    row = {"timestamp": ts.tz_localize(None), "user_city": normalize_text(city), "query": query, "shown": shown}
    if rec.get("display_p") not in (None, ""):
        probs = [float(p) for p in _list(rec["display_p"], "display_p")]
        if len(probs) != len(shown) or not all(0 < p <= 1 for p in probs):
            raise ValueError("display_p: one probability in (0, 1] per shown business")
        row["display_p"] = probs
    row["clicked"] = clicked
    row["policy"] = str(rec.get("policy") or "logged")
    return row


def _checked_rows(path: str | Path, required: tuple[str, ...], make, key: str) -> tuple[list[dict], list[Reject]]:
    """Each record of a user's file as `make(record, line)`, or a reject with its reason; `key` must not repeat."""
    _, unit, records = read_records(path, required)
    rows, rejects, ids = [], [], set()
    for n, rec, err in records:
        try:
            if err:
                raise ValueError(err)
            row = make(rec, n)
            if row[key] in ids:
                raise ValueError(f"{key}: {row[key]!r} used twice")
        except ValueError as e:
            rejects.append(Reject(n, str(e), rec, unit))
            continue
        ids.add(row[key])
        rows.append(row)
    if not rows:
        raise LabeledDataError(f"{path}: no usable row ({len(rejects)} rejected; first: {rejects[0].reason})")
    return rows, rejects


def read_search_log(path: str | Path) -> tuple[pd.DataFrame, list[Reject]]:
    """The log's rows (module doc) in time order, and its rejects."""

    def make(rec: Any, n: int) -> dict[str, Any]:
        row = _log_row(rec)
        return {"query_id": str(rec.get("query_id") or f"{Path(path).stem}:{n}"), **row}

    rows, rejects = _checked_rows(path, LOG_REQUIRED, make, "query_id")
    log = pd.DataFrame(rows)
    if "display_p" in log:  # a row without it is the logging policy's own order
        log["display_p"] = [
            p if isinstance(p, list) else [1.0] * len(s) for p, s in zip(log["display_p"], log["shown"])
        ]
    log["period"] = "early"
    return log.sort_values(["timestamp", "query_id"], kind="stable").reset_index(drop=True), rejects


def _hours(hours: Any) -> dict | None:
    """Opening hours as {weekday: [open, close]}, or None where they are not the documented shape."""
    try:
        spans = json.loads(hours) if isinstance(hours, str) else hours
        ok = isinstance(spans, dict) and all(
            0 <= int(d) <= 6 and len(v) == 2 and 0 <= int(v[0]) < int(v[1]) for d, v in spans.items()
        )
    except (TypeError, ValueError):
        return None
    return spans if ok else None


def _business(rec: Any, schema: Schema) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object, got {type(rec).__name__}")
    out: dict[str, Any] = {}
    for field in CATALOG_REQUIRED:
        value = rec.get(field)
        if value in (None, "") or not str(value).strip():
            raise ValueError(f"{field}: missing or empty")
        out[field] = str(value).strip()
    out["city"] = normalize_text(out["city"])
    for field in ("category", "cuisine", "neighborhood"):
        value = rec.get(field)
        value = normalize_text(str(value)).replace(" ", "_") if field != "neighborhood" and value else value
        if value and field in schema.slots and schema.slots[field].values:
            try:
                value = schema.slots[field].canonical(value)
            except ParseError:
                raise ValueError(f"{field}: {value!r} is not one of the schema's {field} values") from None
        out[field] = normalize_text(str(value)) if field == "neighborhood" and value else value or None
    try:
        out["price_level"] = int(rec["price_level"]) if rec.get("price_level") not in (None, "") else 0
        out["rating"] = float(rec["rating"]) if rec.get("rating") not in (None, "") else 0.0
    except (TypeError, ValueError):
        raise ValueError("price_level / rating: not a number") from None
    if not 0 <= out["price_level"] <= 4 or not 0 <= out["rating"] <= 5:
        raise ValueError("price_level: 1 to 4 (0: unknown); rating: 0 to 5")
    hours = rec.get("hours")
    if hours in (None, ""):
        hours = ALWAYS_OPEN
    spans = _hours(hours)
    if spans is None:
        raise ValueError('hours: JSON {"0": [open, close], ...}: weekday 0-6 -> minutes after midnight')
    out["hours"] = json.dumps({str(int(d)): [int(a), int(b)] for d, (a, b) in sorted(spans.items())})
    for slot in schema.slots.values():
        if slot.filter == "attribute" and slot.attribute:
            value = rec.get(slot.attribute)
            out[slot.attribute] = (
                str(value).strip().lower() in ("1", "true", "yes") if value not in (None, "") else False
            )
    out["text"] = str(rec.get("text") or "").strip() or ". ".join(
        part
        for part in (
            out["name"],
            " ".join(str(v).replace("_", " ") for v in (out["category"], out["cuisine"]) if v),
            ", ".join(v for v in (out["neighborhood"], out["city"]) if v),
        )
        if part
    )
    return out


def read_catalog(path: str | Path, schema: Schema) -> tuple[pd.DataFrame, list[Reject]]:
    """The catalogue's businesses (module doc) and its rejects."""
    rows, rejects = _checked_rows(path, CATALOG_REQUIRED, lambda rec, _n: _business(rec, schema), "business_id")
    return pd.DataFrame(rows), rejects


def trim_pages(searches: pd.DataFrame, known: set[str]) -> tuple[pd.DataFrame, dict[str, int]]:
    """The searches with every business the catalogue lacks taken off their pages (its clicks and display
    probability with it: no search can show it again), and how many pages each such business was on."""
    gone: dict[str, int] = {}
    shown, probs, clicked = [], [], []
    has_p = "display_p" in searches
    for i, page in enumerate(searches["shown"]):
        keep = [j for j, b in enumerate(page) if b in known]
        for b in page:
            if b not in known:
                gone[b] = gone.get(b, 0) + 1
        shown.append([page[j] for j in keep])
        if has_p:
            probs.append([searches["display_p"].iat[i][j] for j in keep])
        clicked.append([b for b in searches["clicked"].iat[i] if b in known])
    searches = searches.assign(shown=shown, clicked=clicked, **({"display_p": probs} if has_p else {}))
    return searches, gone


def assemble(seed: Path, log: Path, catalog: Path, out: Path, schema: Schema) -> dict[str, Any]:
    """Write the world folder (module doc); returns the counts. A business the log shows but the catalogue lacks is
    taken off every page (`trim_pages`), said once in the rejects with the number of pages."""
    labeled, seed_rejects = load_labeled(seed, schema)
    if not labeled:
        raise LabeledDataError(f"{seed}: no row fits the schema ({len(seed_rejects)} rejected)")
    businesses, catalog_rejects = read_catalog(catalog, schema)
    searches, log_rejects = read_search_log(log)
    searches, gone = trim_pages(searches, set(businesses["business_id"]))
    out.mkdir(parents=True, exist_ok=True)
    write_labeled(labeled, out / "seed.jsonl")
    searches.to_parquet(out / "log.parquet", index=False)
    businesses.to_parquet(out / "catalog.parquet", index=False)
    lines = [(f"{file}:{r.where}", r.reason) for file, rs in ((seed, seed_rejects), (catalog, catalog_rejects),
                                                             (log, log_rejects)) for r in rs]  # fmt: skip
    lines += [
        (f"{log}: shown {b}", f"not in {catalog.name}: taken off the {n} pages that show it") for b, n in gone.items()
    ]
    with (out / "rejects.jsonl").open("w", encoding="utf-8") as f:
        for where, reason in lines:
            f.write(json.dumps({"where": where, "reason": reason}, ensure_ascii=False) + "\n")
    return {
        "seed_rows": len(labeled),
        "log_rows": len(searches),
        "businesses": len(businesses),
        "rejected": {"seed": len(seed_rejects), "log": len(log_rejects), "catalog": len(catalog_rejects)},
        "shown_not_in_catalog": len(gone),
    }
