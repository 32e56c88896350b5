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
import re
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from querytune.catalog import hours_array
from querytune.metrics import ndcg_at_k
from querytune.schema import load_schema, normalize_text
from querytune.search import Bm25
from querytune.world.catalog import CATEGORY_LABELS, make_catalog
from querytune.world.mechanisms import (
    DRIFT_TERMS,
    FINE_TO_BROAD,
    MECHANISMS,
    SEED_DAYS,
    SWAP_P,
    SWAP_POOL,
    TEST_SHARES,
    annotate,
    drift_rate,
)
from querytune.world.queries import V1, V2, Market, graded_relevance, named_need, render, sample_need
from querytune.world.vocab import ATTRIBUTES, CATEGORIES, CITIES, CUISINES

START = datetime(2026, 8, 31)  # a Monday
DAYS_LOGGED, EARLY_DAYS = 56, 42  # 8 weeks; the first 6 are the "early" part that training reads
HEAD_SHARE, POOL_SIZE, ZIPF_S = 0.62, 6000, 0.9
SEED_ROWS, EVAL_ROWS, SEED_ERROR_RATE = 2000, 1200, 0.07
EXAMINE_POWER, CLICK_P, STOP_P = 0.7, {2: 0.55, 1: 0.2, 0: 0.07}, 0.6
V1_VALUES = {"cuisine": set(CUISINES), "price": {"cheap", "moderate", "expensive"}}  # what v1's seed noise draws from


@dataclass(frozen=True)
class Profile:
    name: str
    market: Market
    guideline_gap: bool  # seed labels follow the guideline (mechanisms.annotate), not the need
    drift: bool  # new terms ramp into the log after the seed's two weeks


PROFILES = {"v2": Profile("v2", V2, True, True), "stationary": Profile("stationary", V2, False, False), "v1": Profile("v1", V1, False, False)}


def catalog_arrays(catalog: pd.DataFrame) -> dict:
    cat = {c: catalog[c].to_numpy() for c in ("category", "neighborhood", "price_level", "rating", "city")}
    cat["cuisine"] = catalog["cuisine"].fillna("").to_numpy()
    cat["name_lower"] = catalog["name"].str.lower().to_numpy()
    cat["hours"] = hours_array(catalog["hours"])
    for a in ATTRIBUTES:
        cat[a] = catalog[a].to_numpy(dtype=bool)
    return cat


class LoggingRanker:
    """The legacy ranker whose results the log shows: BM25 in one city + a small rating prior. With `synonyms`
    (v2), query words that name a category or cuisine in the search team's synonym table add that label to the
    query (as production lexical search does: "coffee shop" finds cafes, not tire shops first)."""

    def __init__(self, catalog: pd.DataFrame, city_rows: dict, synonyms: dict[str, str] | None = None):
        self.bm25 = Bm25(catalog["text"].tolist())
        self.city_rows, self.rating = city_rows, catalog["rating"].to_numpy()
        self.gazetteer = sorted(((f" {n} ", c) for c, (_, _, al) in CITIES.items() for n in [c, *al]), key=lambda x: -len(x[0]))
        self.synonyms = sorted(((f" {k} ", v) for k, v in (synonyms or {}).items()), key=lambda x: -len(x[0]))
        self.cache: dict = {}

    def expand(self, norm_query: str) -> str:
        padded, labels = f" {norm_query} ", []
        for surface, label in self.synonyms:
            if surface in padded and label not in labels:
                labels.append(label)
        return " ".join([norm_query] + [f"{label} {label}" for label in labels])  # twice: the label outweighs a stray word

    def randomised(self, rng: random.Random, norm_query: str, user_city: str, k: int = 10) -> tuple[np.ndarray, list[float]]:
        """The shown list with each of positions 1..k-1 swapped, with probability SWAP_P, for a business drawn from
        ranks SWAP_POOL; and each shown business's probability of being displayed at its position."""
        ranked = self.shown(norm_query, user_city, SWAP_POOL[1])
        shown, probs = list(ranked[:k]), [1.0] + [1.0 - SWAP_P] * (min(k, len(ranked)) - 1)
        pool = list(ranked[SWAP_POOL[0]:])
        for pos in range(1, len(shown)):
            if pool and rng.random() < SWAP_P:
                shown[pos] = pool.pop(rng.randrange(len(pool)))
                probs[pos] = SWAP_P / (len(ranked) - SWAP_POOL[0])
        return np.array(shown, dtype=int), [round(p, 6) for p in probs]

    def city_of(self, norm_query: str, user_city: str) -> str:
        padded = f" {norm_query} "
        for name, city in self.gazetteer:
            if name in padded:
                return city
        return user_city

    def shown(self, norm_query: str, user_city: str, k: int = 10) -> np.ndarray:
        city = self.city_of(norm_query, user_city)
        key = (norm_query, city)
        if key not in self.cache:
            idx = self.city_rows[city]
            scores = self.bm25.scores(self.expand(norm_query))[idx] + 0.15 * self.rating[idx]
            self.cache[key] = idx[np.lexsort((idx, -scores))[:max(k, SWAP_POOL[1] if self.synonyms else k)]]
        return self.cache[key][:k]


def synonym_table(market: Market) -> dict[str, str]:
    """The search team's synonym table: every surface of a category or cuisine (v2's, before drift) -> its label."""
    table = {s: CATEGORY_LABELS[c] for c, v in CATEGORIES.items() for s in v[4]}
    for cuisine, (_, surfaces, slang) in market.cuisines.items():
        table |= {s: cuisine.replace("_", " ") for s in surfaces + slang}
    return table


def _clicks(rng: random.Random, shown: np.ndarray, rel: dict[int, int]) -> list[int]:
    out = []
    for pos, b in enumerate(shown):
        if rng.random() < 1.0 / (pos + 1) ** EXAMINE_POWER:
            grade = rel.get(int(b), 0)
            if rng.random() < CLICK_P[grade]:
                out.append(int(b))
                if grade == 2 and rng.random() < STOP_P:
                    break
    return out


def _context(rng: random.Random, cities: list[str], weights: list[float]) -> tuple[str, datetime]:
    city = rng.choices(cities, weights)[0]
    day = rng.randrange(DAYS_LOGGED)
    hour = rng.choices(range(24), [1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3, 3, 3, 4, 6, 5, 4, 4, 5, 7, 8, 8, 6, 4, 3, 2])[0]
    return city, START + timedelta(days=day, hours=hour, minutes=rng.randrange(60))


def drifted(rng: random.Random, r, need: dict, day: float):
    """The rendering with each drift-able value's surface replaced by its new term at the day's drift rate."""
    p = drift_rate(day)
    terms = [(slot, DRIFT_TERMS[(slot, v)]) for slot, v in need["slots"].items() if (slot, v) in DRIFT_TERMS and slot in r.surfaces]
    if not p or not terms:
        return r
    text, used = r.text, dict(r.surfaces)
    for slot, term in terms:
        if rng.random() < p:
            pattern = re.compile(rf"\b{re.escape(used[slot])}\b", re.IGNORECASE)
            if pattern.search(text):
                text, used[slot] = pattern.sub(term, text, count=1), term
    return replace(r, text=text, surfaces=used) if text != r.text else r


def make_world(out: str | Path, seed: int = 0, rows: int = 120_000, per_city: int = 280, progress=None, profile: str = "v2",
               eval_rows: int = EVAL_ROWS) -> dict:
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
        need = sample_need(rng, user_city, (0.55, 0.3, 0.12, 0.03) if simple else (0.3, 0.35, 0.23, 0.12), market=prof.market)
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
        user_city, ts = _context(rng, cities, weights)
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
        clicked = _clicks(rng, shown, rel)
        qid = f"q{i:06d}"
        log.append({"query_id": qid, "timestamp": ts, "user_city": user_city, "query": r.text,
                    "shown": [str(ids[b]) for b in shown], **({"display_p": display_p} if v2 else {}),
                    "clicked": [str(ids[b]) for b in clicked],
                    "period": "early" if ts < START + timedelta(days=EARLY_DAYS) else "late"})
        needs_audit.append({"query_id": qid, "intent": need["intent"], "slots": json.dumps(need["slots"], sort_keys=True),
                            "phrasing": r.family, "phrasing_in_seed": r.covered, "effects": ",".join(r.effects),
                            "satisfying_clicks": sum(rel.get(int(b), 0) == 2 for b in clicked),
                            **({"annotation": json.dumps(annotation if prof.guideline_gap else need, sort_keys=True),
                                "mechanisms": ",".join(tags)} if v2 else {})})
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
        return {"id": row["query_id"], "text": row["query"], "intent": label["intent"], "slots": label["slots"],
                "timestamp": row["timestamp"].isoformat(), "user_city": row["user_city"]}

    early_idx = np.flatnonzero((log_df["period"] == "early").to_numpy())
    if v2:  # the seed is annotated from the first two weeks, by the guideline
        early_idx = np.flatnonzero((log_df["timestamp"] < START + timedelta(days=SEED_DAYS)).to_numpy())
    late_idx = np.flatnonzero((log_df["period"] == "late").to_numpy())
    seed_rows, seen = [], set()
    for j in random.Random(seed + 1).sample(list(early_idx), len(early_idx)):
        if audit_df.at[j, "phrasing_in_seed"] and norm.iat[j] not in seen and len(seed_rows) < SEED_ROWS:
            seen.add(norm.iat[j])
            seed_rows.append(labeled_row(j, json.loads(audit_df.at[j, "annotation"]) if v2 else None))
    errors = _corrupt_labels(random.Random(seed + 2), seed_rows, schema, None if v2 else V1_VALUES)

    def eval_row(j: int) -> dict:
        row = labeled_row(j)
        row |= {"relevance": {str(ids[b]): g for b, g in sorted(rels[j].items())},
                "seen_in_early_log": norm.iat[j] in early_texts, "traffic": bucket[norm.iat[j]],
                "phrasing": audit_df.at[j, "phrasing"], "phrasing_in_seed": bool(audit_df.at[j, "phrasing_in_seed"]),
                "effects": [e for e in audit_df.at[j, "effects"].split(",") if e]}
        if v2:
            row |= {"need": {"intent": row["intent"], "slots": row["slots"]}, "annotation": json.loads(audit_df.at[j, "annotation"]),
                    "mechanisms": tags_of[j]}
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
                room = [n for n in eval_sets if len(eval_sets[n]) < size and all(counts[n][t] < quota[t] for t in tags_of[j])]
                if not room:
                    continue
                name = min(room, key=lambda n: (len(eval_sets[n]), n))
                used.add(norm.iat[j])
                counts[name].update(tags_of[j])
                eval_sets[name].append(eval_row(j))
        for name in eval_sets:  # in log order, as before, not grouped by mechanism
            eval_sets[name].sort(key=lambda r: (r["timestamp"], r["id"]))

    say("writing")
    _write_parquet(catalog, out / "catalog.parquet")
    _write_parquet(log_df, out / "log.parquet")
    _write_parquet(audit_df, out / "audit" / "needs.parquet")
    _write_jsonl(seed_rows, out / "seed.jsonl")
    _write_jsonl(errors, out / "audit" / "seed_label_errors.jsonl")
    for name, rows_ in eval_sets.items():
        _write_jsonl(rows_, out / f"{name}.jsonl")
    stats = world_stats(catalog, log_df, audit_df, rels, seed_rows, errors, eval_sets, freq, ids)
    stats["world_seed"] = seed
    if v2:
        stats |= v2_stats(prof, catalog, log_df, audit_df, rels, shown_lists, tags_of, eval_sets, generic, ids)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


def v2_stats(prof, catalog, log_df, audit_df, rels, shown_lists, tags_of, eval_sets, generic, ids) -> dict:
    """What world make prints beside the issue's requirements: mechanism shares, the logging ranker's NDCG@10,
    and that every neighbourhood-only need was typed where that neighbourhood is."""
    hoods = {(c, h) for c, h in zip(catalog["city"], catalog["neighborhood"])}
    hood_only = [(json.loads(s), c) for s, c in zip(audit_df["slots"], log_df["user_city"])]
    hood_only = [(s, c) for s, c in hood_only if "neighborhood" in s and "city" not in s]
    gradable = [j for j, rel in enumerate(rels) if 2 in rel.values()]
    ndcg = [ndcg_at_k([str(ids[b]) for b in shown_lists[j]], {str(ids[b]): g for b, g in rels[j].items()}) for j in gradable]
    n_shown = sum(len(p) for p in log_df["display_p"])
    seed_diff = sum(json.loads(a) != {"intent": i, "slots": json.loads(s)} for a, i, s in
                    zip(audit_df["annotation"], audit_df["intent"], audit_df["slots"]))
    fine = catalog["cuisine"].isin(list(FINE_TO_BROAD))
    return {
        "profile": prof.name,
        "mechanisms": {
            "required_test_share": TEST_SHARES,
            "log_share": {m: round(sum(m in t for t in tags_of) / len(tags_of), 4) for m in MECHANISMS},
            **{name: {m: round(sum(m in r["mechanisms"] for r in rows) / max(1, len(rows)), 4) for m in MECHANISMS}
               for name, rows in eval_sets.items()},
            "log_share_annotation_differs": round(seed_diff / len(audit_df), 4),
        },
        "catalog_v2": {"restaurants_with_fine_cuisine": int(fine.sum()), "restaurants": int(catalog["cuisine"].notna().sum()),
                       "generic_names": len(generic)},
        "ranker": {"ndcg10": round(float(np.mean(ndcg)), 4), "gradable_rows": len(gradable),
                   "share_impressions_randomised": round(sum(p < 1 - SWAP_P for ps in log_df["display_p"] for p in ps) / max(1, n_shown), 4)},
        "neighborhood_only": {"rows": len(hood_only), "unsatisfiable": sum((c, s["neighborhood"]) not in hoods for s, c in hood_only)},
    }


def _corrupt_labels(rng: random.Random, rows: list[dict], schema, allowed: dict[str, set] | None = None) -> list[dict]:
    """Give SEED_ERROR_RATE of rows, chosen independently of their text, one random label error. `allowed`: per
    slot, the values a wrong value is drawn from (v1 keeps to the values its schema had)."""
    intents = list(schema.intents)
    errors = []
    for row in rows:
        if rng.random() >= SEED_ERROR_RATE:
            continue
        true = {"intent": row["intent"], "slots": dict(row["slots"])}
        kind = rng.choice(["intent", "drop_slot", "value", "extra_slot"])
        if kind == "drop_slot" and row["slots"]:
            row["slots"].pop(rng.choice(sorted(row["slots"])))
        elif kind == "value" and any(schema.slots[k].type == "categorical" for k in row["slots"]):
            k = rng.choice(sorted(k for k in row["slots"] if schema.slots[k].type == "categorical"))
            row["slots"][k] = rng.choice([v for v in schema.slots[k].values if v != row["slots"][k] and (not allowed or k not in allowed or v in allowed[k])])
        elif kind == "extra_slot" and row["intent"] != "out_of_scope" and (
                extra := [k for k in ("near_me", "kid_friendly", "delivery", "outdoor_seating") if k not in row["slots"]]):
            row["slots"][rng.choice(extra)] = True
        else:
            kind = "intent"
            row["intent"] = rng.choice([i for i in intents if i != row["intent"]])
            if row["intent"] == "out_of_scope":
                row["slots"] = {}
        row["slots"] = dict(sorted(row["slots"].items()))
        errors.append({"id": row["id"], "kind": kind, "true": true, "given": {"intent": row["intent"], "slots": row["slots"]}})
    return errors


def world_stats(catalog, log_df, audit_df, rels, seed_rows, errors, eval_sets, freq, ids) -> dict:
    clicks = [(c, rels[j]) for j, cs in enumerate(log_df["clicked"]) for c in cs]
    id_to_row = {b: i for i, b in enumerate(ids)}
    unsatisfying = sum(r.get(id_to_row[c], 0) < 2 for c, r in clicks)
    top = freq.iloc[: max(1, len(freq) // 100)].sum()
    stat = lambda rows, key: round(float(np.mean([r[key] for r in rows])), 4)  # noqa: E731
    return {
        "catalog": {"businesses": len(catalog), "cities": catalog["city"].nunique(),
                    "neighborhoods": int(catalog[["city", "neighborhood"]].drop_duplicates().shape[0]),
                    "categories": catalog["category"].nunique(), "cuisines": catalog["cuisine"].nunique()},
        "log": {"rows": len(log_df), "distinct_queries": int(len(freq)),
                "share_rows_seen_once": round(float((freq == 1).sum() / len(log_df)), 4),
                "share_traffic_top1pct_queries": round(float(top / len(log_df)), 4),
                "clicks": len(clicks), "share_clicks_not_satisfying": round(unsatisfying / max(1, len(clicks)), 4),
                "rows_early": int((log_df["period"] == "early").sum()), "rows_late": int((log_df["period"] == "late").sum()),
                "intents": {k: int(v) for k, v in audit_df["intent"].value_counts().sort_index().items()},
                "share_phrasing_in_seed_style": round(float(audit_df["phrasing_in_seed"].mean()), 4)},
        "seed": {"rows": len(seed_rows), "label_errors": len(errors), "label_error_rate": round(len(errors) / max(1, len(seed_rows)), 4)},
        **{name: {"rows": len(rows), "share_seen_in_early_log": stat(rows, "seen_in_early_log"),
                  "share_phrasing_in_seed": stat(rows, "phrasing_in_seed"),
                  "traffic": dict(sorted(Counter(r["traffic"] for r in rows).items())),
                  "effects": dict(sorted(Counter(e for r in rows for e in r["effects"]).items()))} for name, rows in eval_sets.items()},
    }


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, compression="zstd")


def _write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n")
