"""Make the embedded default world: a seeded, deterministic local-service market.

    querytune world make --out runs/world [--seed 0] [--profile v2|stationary|v1]

Writes catalog.parquet, log.parquet, seed.jsonl, dev.jsonl, test.jsonl, stats.json and audit/ (hidden
needs and the seed's label errors, for analysis only: no training stage reads audit/). The same seed gives
byte-identical folders. Every column is documented in docs/world.md.

The log: each row is a user (city, timestamp) typing a query for a hidden need. 62% of rows come from a
pool of popular queries with Zipf popularity (the head: short, clean), the rest are fresh needs rendered
with the full range of phrasings and typos (the tail). The logging ranker that chose the shown results is
the legacy lexical system: BM25 over business texts (bm25s) in the user's city, or in a city whose name or
alias appears as words in the query, plus 0.15 x rating; it never sees the need. Clicks follow a
position-biased cascade: position i (0-based) is examined with probability 1/(i+1)^0.7; an examined result
is clicked with probability 0.55 if it satisfies the need (grade 2), 0.2 if it nearly does (grade 1), 0.07
otherwise; after a satisfying click the user stops with probability 0.6.

Profiles. `v1` is the world above, kept byte for byte so earlier figures can be rerun. `v2` (the default) is a
market whose log knows what the annotation guideline does not (mechanisms.py: taxonomy, drift, generic-word names,
filter wording): the seed is annotated from the first two weeks by the guideline (plus the same random noise),
dev/test rows are drawn so that each mechanism touches its share of them, and each carries `need`, `annotation`
and `mechanisms`. Its constraints occur as they do for the category, a neighbourhood-only need is typed in that
neighbourhood's city, and the logging ranker expands category synonyms and swaps a few slots with deeper ranks
(the log records each shown business's display probability, so clicks can be debiased). `stationary` is the v2
market with guideline = need and no drift: the control world in which a reward stage must gain nothing.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from querytune.hours import hours_array
from querytune.schema import normalize_text
from querytune.schema_file import load_schema
from querytune.world.catalog import make_catalog
from querytune.world.log import EARLY_DAYS, START, LoggingRanker, cascade_clicks, drifted, synonym_table, user_context
from querytune.world.mechanisms import MECHANISMS, SEED_DAYS, TEST_SHARES, annotate
from querytune.world.needs import V1, V2, Market, graded_relevance, named_need, sample_need
from querytune.world.output import corrupt_labels, v2_stats, world_stats, write_jsonl, write_parquet
from querytune.world.queries import render
from querytune.world.vocab import ATTRIBUTES, CITIES, CUISINES

HEAD_SHARE, POOL_SIZE, ZIPF_S = 0.62, 6000, 0.9
SEED_ROWS, EVAL_ROWS = 2000, 1200
V1_VALUES = {"cuisine": set(CUISINES), "price": {"cheap", "moderate", "expensive"}}  # what v1's seed noise draws from


@dataclass(frozen=True)
class Profile:
    name: str
    market: Market
    guideline_gap: bool  # seed labels follow the guideline (mechanisms.annotate), not the need
    drift: bool  # new terms ramp into the log after the seed's two weeks


PROFILES = {
    "v2": Profile("v2", V2, True, True),
    "stationary": Profile("stationary", V2, False, False),
    "v1": Profile("v1", V1, False, False),
}


def catalog_arrays(catalog: pd.DataFrame) -> dict:
    cat = {c: catalog[c].to_numpy() for c in ("category", "neighborhood", "price_level", "rating", "city")}
    cat["cuisine"] = catalog["cuisine"].fillna("").to_numpy()
    cat["name_lower"] = catalog["name"].str.lower().to_numpy()
    cat["hours"] = hours_array(catalog["hours"])
    for a in ATTRIBUTES:
        cat[a] = catalog[a].to_numpy(dtype=bool)
    return cat


def make_world(
    out: str | Path,
    seed: int = 0,
    rows: int = 120_000,
    per_city: int = 280,
    progress=None,
    profile: str = "v2",
    eval_rows: int = EVAL_ROWS,
) -> dict:
    """Build the world into `out` and return its stats. `progress(description)` is called per phase; `eval_rows`:
    the size of dev and of test (fewer when the late log has too few distinct texts)."""
    if profile not in PROFILES:
        raise ValueError(f"profile: {profile!r} is not one of {', '.join(PROFILES)}")
    prof = PROFILES[profile]
    v2 = prof.market is V2
    out = Path(out)
    (out / "audit").mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)
    schema = load_schema()
    rng = random.Random(seed)
    say("catalog")
    catalog = make_catalog(np.random.default_rng(seed), per_city=per_city, market=prof.market.name)
    generic: dict[str, str] = {}
    if "generic_name" in catalog:  # the guideline's knowledge, not the catalogue's: never written
        flags = catalog.pop("generic_name").to_numpy(dtype=bool)
        generic = {n.lower(): c for n, c, f in zip(catalog["name"], catalog["category"], flags) if f}
    cat = catalog_arrays(catalog)
    city_rows = {c: np.flatnonzero(cat["city"] == c) for c in CITIES}
    by_city = {c: catalog.iloc[city_rows[c]][["name", "city", "neighborhood"]].to_dict("records") for c in CITIES}
    cities, weights = list(CITIES), [CITIES[c][0] for c in CITIES]

    def need_for(user_city: str, simple: bool) -> dict:
        need = sample_need(
            rng, user_city, (0.55, 0.3, 0.12, 0.03) if simple else (0.3, 0.35, 0.23, 0.12), market=prof.market
        )
        if need["intent"] == "find_named_business":
            home = user_city if rng.random() < 0.8 else rng.choices(cities, weights)[0]
            need = named_need(rng, user_city, by_city[home][rng.randrange(len(by_city[home]))])
        return need

    say("popular queries")
    # Popularity rank = how often the need prior produces a text (then Zipf): the head is what many people want.
    pool: dict[str, list] = {}
    while len(pool) < POOL_SIZE:
        city = rng.choices(cities, weights)[0]
        need = need_for(city, simple=True)
        if need["intent"] == "find_named_business" and "city" not in need["slots"]:
            continue  # a popular named query without a city would mean different businesses per user
        r = render(rng, need, seed_style=rng.random() < 0.5, market=prof.market)
        entry = pool.setdefault(normalize_text(r.text), [need, r, 0, city])
        entry[2] += 0.05 if need["intent"] == "out_of_scope" else 1  # a local search box sees few of these
    pool_items = sorted(pool.values(), key=lambda e: (-e[2], len(e[0]["slots"]), len(e[1].text)))
    pool_items = [(need, r, city) for need, r, _, city in pool_items]
    zipf = 1.0 / np.arange(1, len(pool_items) + 1) ** ZIPF_S
    zipf_cum = list(np.cumsum(zipf / zipf.sum()))

    say("query log")
    ranker = LoggingRanker(catalog, city_rows, synonym_table(prof.market) if v2 else None)
    log, needs_audit, rels = [], [], []
    ids = catalog["business_id"].to_numpy()
    for i in range(rows):
        user_city, ts = user_context(rng, cities, weights)
        if rng.random() < HEAD_SHARE:
            need, r, home = pool_items[min(int(np.searchsorted(zipf_cum, rng.random())), len(pool_items) - 1)]
            if v2 and "neighborhood" in need["slots"] and "city" not in need["slots"]:
                user_city = home  # "bakeries brickell" is typed by people in Miami
        else:
            need = need_for(user_city, simple=False)
            r = render(rng, need, seed_style=rng.random() < 0.15, noise=0.3, market=prof.market)
        if prof.drift:
            r = drifted(rng, r, need, (ts - START).total_seconds() / 86400)
        annotation, tags = annotate(need, r.surfaces, generic) if v2 else (need, [])
        rel = graded_relevance(need, cat, city_rows, user_city, ts.weekday(), ts.hour * 60 + ts.minute)
        display_p: list[float] = []
        if need["intent"] != "out_of_scope" or rng.random() < 0.5:
            if v2:
                shown, display_p = ranker.randomised(rng, normalize_text(r.text), user_city)
            else:
                shown = ranker.shown(normalize_text(r.text), user_city)
        else:
            shown = np.array([], dtype=int)
        clicked = cascade_clicks(rng, shown, rel)
        qid = f"q{i:06d}"
        log.append(
            {
                "query_id": qid,
                "timestamp": ts,
                "user_city": user_city,
                "query": r.text,
                "shown": [str(ids[b]) for b in shown],
                **({"display_p": display_p} if v2 else {}),
                "clicked": [str(ids[b]) for b in clicked],
                "period": "early" if ts < START + timedelta(days=EARLY_DAYS) else "late",
            }
        )
        needs_audit.append(
            {
                "query_id": qid,
                "intent": need["intent"],
                "slots": json.dumps(need["slots"], sort_keys=True),
                "phrasing": r.family,
                "phrasing_in_seed": r.covered,
                "effects": ",".join(r.effects),
                "satisfying_clicks": sum(rel.get(int(b), 0) == 2 for b in clicked),
                **(
                    {
                        "annotation": json.dumps(annotation if prof.guideline_gap else need, sort_keys=True),
                        "mechanisms": ",".join(tags),
                    }
                    if v2
                    else {}
                ),
            }
        )
        rels.append((rel, shown) if v2 else rel)
    log_df = pd.DataFrame(log).sort_values(["timestamp", "query_id"], kind="stable").reset_index(drop=True)
    audit_df = pd.DataFrame(needs_audit).set_index("query_id").loc[log_df["query_id"]].reset_index()
    order_rows = [int(q[1:]) for q in log_df["query_id"]]
    shown_lists = [rels[j][1] for j in order_rows] if v2 else None
    rels = [rels[j][0] if v2 else rels[j] for j in order_rows]

    say("labeled sets")
    norm = log_df["query"].map(normalize_text)
    freq = norm.value_counts()
    order = freq.sort_values(ascending=False, kind="stable")
    cum = order.cumsum() / order.sum()
    bucket = pd.Series(np.where(cum <= 1 / 3, "head", np.where(cum <= 2 / 3, "torso", "tail")), index=order.index)
    early_texts = set(norm[log_df["period"] == "early"])
    tags_of = [[t for t in m.split(",") if t] for m in audit_df["mechanisms"]] if v2 else None

    def labeled_row(j: int, label: dict | None = None) -> dict:
        row, a = log_df.iloc[j], audit_df.iloc[j]
        label = label or {"intent": a["intent"], "slots": json.loads(a["slots"])}
        return {
            "id": row["query_id"],
            "text": row["query"],
            "intent": label["intent"],
            "slots": label["slots"],
            "timestamp": row["timestamp"].isoformat(),
            "user_city": row["user_city"],
        }

    early_idx = np.flatnonzero((log_df["period"] == "early").to_numpy())
    if v2:  # the seed is annotated from the first two weeks, by the guideline
        early_idx = np.flatnonzero((log_df["timestamp"] < START + timedelta(days=SEED_DAYS)).to_numpy())
    late_idx = np.flatnonzero((log_df["period"] == "late").to_numpy())
    seed_rows, seen = [], set()
    for j in random.Random(seed + 1).sample(list(early_idx), len(early_idx)):
        if audit_df.at[j, "phrasing_in_seed"] and norm.iat[j] not in seen and len(seed_rows) < SEED_ROWS:
            seen.add(norm.iat[j])
            seed_rows.append(labeled_row(j, json.loads(audit_df.at[j, "annotation"]) if v2 else None))
    errors = corrupt_labels(random.Random(seed + 2), seed_rows, schema, None if v2 else V1_VALUES)

    def eval_row(j: int) -> dict:
        row = labeled_row(j)
        row |= {
            "relevance": {str(ids[b]): g for b, g in sorted(rels[j].items())},
            "seen_in_early_log": norm.iat[j] in early_texts,
            "traffic": bucket[norm.iat[j]],
            "phrasing": audit_df.at[j, "phrasing"],
            "phrasing_in_seed": bool(audit_df.at[j, "phrasing_in_seed"]),
            "effects": [e for e in audit_df.at[j, "effects"].split(",") if e],
        }
        if v2:
            row |= {
                "need": {"intent": row["intent"], "slots": row["slots"]},
                "annotation": json.loads(audit_df.at[j, "annotation"]),
                "mechanisms": tags_of[j],
            }
        return row

    def gradable(j: int) -> bool:  # something satisfies this need at that time and place
        return audit_df.at[j, "intent"] == "out_of_scope" or 2 in rels[j].values()

    eval_sets: dict[str, list] = {"dev": [], "test": []}
    used: set[str] = set()
    late_order = random.Random(seed + 3).sample(list(late_idx), len(late_idx))
    if not v2:
        for j in late_order:
            name = "dev" if len(eval_sets["dev"]) <= len(eval_sets["test"]) else "test"
            if len(eval_sets[name]) >= eval_rows or norm.iat[j] in used:
                if all(len(v) >= eval_rows for v in eval_sets.values()):
                    break
                continue
            if not gradable(j):
                continue
            used.add(norm.iat[j])
            eval_sets[name].append(eval_row(j))
    else:  # stratified: first the rows a mechanism touches, to each mechanism's quota, then untouched rows
        size = min(eval_rows, len({norm.iat[j] for j in late_order if gradable(j)}) // 2)
        quota = {m: round(TEST_SHARES[m] * size) for m in MECHANISMS}
        counts = {name: Counter() for name in eval_sets}
        for tagged in (True, False):
            for j in late_order:
                if bool(tags_of[j]) != tagged or norm.iat[j] in used or not gradable(j):
                    continue
                room = [
                    n
                    for n in eval_sets
                    if len(eval_sets[n]) < size and all(counts[n][t] < quota[t] for t in tags_of[j])
                ]
                if not room:
                    continue
                name = min(room, key=lambda n: (len(eval_sets[n]), n))
                used.add(norm.iat[j])
                counts[name].update(tags_of[j])
                eval_sets[name].append(eval_row(j))
        for name in eval_sets:  # in log order, as before, not grouped by mechanism
            eval_sets[name].sort(key=lambda r: (r["timestamp"], r["id"]))

    say("writing")
    write_parquet(catalog, out / "catalog.parquet")
    write_parquet(log_df, out / "log.parquet")
    write_parquet(audit_df, out / "audit" / "needs.parquet")
    write_jsonl(seed_rows, out / "seed.jsonl")
    write_jsonl(errors, out / "audit" / "seed_label_errors.jsonl")
    for name, rows_ in eval_sets.items():
        write_jsonl(rows_, out / f"{name}.jsonl")
    stats = world_stats(catalog, log_df, audit_df, rels, seed_rows, errors, eval_sets, freq, ids)
    stats["world_seed"] = seed
    if v2:
        stats |= v2_stats(prof, catalog, log_df, audit_df, rels, shown_lists, tags_of, eval_sets, generic, ids)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats
