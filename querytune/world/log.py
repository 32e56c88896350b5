"""The query log's moving parts: who searches when, what the legacy logging ranker shows, what gets clicked,
and how new terms drift into the typed text. make.py draws the needs and runs these row by row.

The logging ranker is BM25 over business texts in the user's city (or one the query names) plus 0.15 x rating;
it never sees the need. Clicks follow a position-biased cascade (EXAMINE_POWER, CLICK_P, STOP_P).
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from querytune.search import Bm25
from querytune.world.catalog import CATEGORY_LABELS
from querytune.world.mechanisms import DRIFT_TERMS, SWAP_P, SWAP_POOL, drift_rate
from querytune.world.needs import Market
from querytune.world.vocab import CATEGORIES, CITIES

START = datetime(2026, 8, 31)  # a Monday
DAYS_LOGGED, EARLY_DAYS = 56, 42  # 8 weeks; the first 6 are the "early" part that training reads
EXAMINE_POWER, CLICK_P, STOP_P = 0.7, {2: 0.55, 1: 0.2, 0: 0.07}, 0.6


class LoggingRanker:
    """The legacy ranker whose results the log shows: BM25 in one city + a small rating prior. With `synonyms`
    (v2), query words that name a category or cuisine in the search team's synonym table add that label to the
    query (as production lexical search does: "coffee shop" finds cafes, not tire shops first)."""

    def __init__(self, catalog: pd.DataFrame, city_rows: dict, synonyms: dict[str, str] | None = None):
        self.bm25 = Bm25(catalog["text"].tolist())
        self.city_rows, self.rating = city_rows, catalog["rating"].to_numpy()
        self.gazetteer = sorted(
            ((f" {n} ", c) for c, (_, _, al) in CITIES.items() for n in [c, *al]), key=lambda x: -len(x[0])
        )
        self.synonyms = sorted(((f" {k} ", v) for k, v in (synonyms or {}).items()), key=lambda x: -len(x[0]))
        self.cache: dict = {}

    def expand(self, norm_query: str) -> str:
        padded, labels = f" {norm_query} ", []
        for surface, label in self.synonyms:
            if surface in padded and label not in labels:
                labels.append(label)
        return " ".join(
            [norm_query] + [f"{label} {label}" for label in labels]
        )  # twice: the label outweighs a stray word

    def randomised(
        self, rng: random.Random, norm_query: str, user_city: str, k: int = 10
    ) -> tuple[np.ndarray, list[float]]:
        """The shown list with each of positions 1..k-1 swapped, with probability SWAP_P, for a business drawn from
        ranks SWAP_POOL; and each shown business's probability of being displayed at its position."""
        ranked = self.shown(norm_query, user_city, SWAP_POOL[1])
        shown, probs = list(ranked[:k]), [1.0] + [1.0 - SWAP_P] * (min(k, len(ranked)) - 1)
        pool = list(ranked[SWAP_POOL[0] :])
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
            self.cache[key] = idx[np.lexsort((idx, -scores))[: max(k, SWAP_POOL[1] if self.synonyms else k)]]
        return self.cache[key][:k]


def synonym_table(market: Market) -> dict[str, str]:
    """The search team's synonym table: every surface of a category or cuisine (v2's, before drift) -> its label."""
    table = {s: CATEGORY_LABELS[c] for c, v in CATEGORIES.items() for s in v[4]}
    for cuisine, (_, surfaces, slang) in market.cuisines.items():
        table |= {s: cuisine.replace("_", " ") for s in surfaces + slang}
    return table


def cascade_clicks(
    rng: random.Random | None, shown: np.ndarray, rel: dict[int, int], draws: np.ndarray | None = None
) -> list[int]:
    """The shown businesses (row indices) a user clicks, in order. `draws` (positions x 3 uniforms: examine, click,
    stop) replace `rng`'s stream: a user who decides the same at each position whatever is shown there
    (`world traffic`, where the policy changes what is shown but must not change the user)."""
    u = (lambda pos, j: draws[pos, j]) if draws is not None else (lambda pos, j: rng.random())
    out = []
    for pos, b in enumerate(shown):
        if u(pos, 0) < 1.0 / (pos + 1) ** EXAMINE_POWER:
            grade = rel.get(int(b), 0)
            if u(pos, 1) < CLICK_P[grade]:
                out.append(int(b))
                if grade == 2 and u(pos, 2) < STOP_P:
                    break
    return out


def user_context(rng: random.Random, cities: list[str], weights: list[float]) -> tuple[str, datetime]:
    city = rng.choices(cities, weights)[0]
    day = rng.randrange(DAYS_LOGGED)
    hour = rng.choices(range(24), [1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3, 3, 3, 4, 6, 5, 4, 4, 5, 7, 8, 8, 6, 4, 3, 2])[0]
    return city, START + timedelta(days=day, hours=hour, minutes=rng.randrange(60))


def drifted(rng: random.Random, r, need: dict, day: float):
    """The rendering with each drift-able value's surface replaced by its new term at the day's drift rate."""
    p = drift_rate(day)
    terms = [
        (slot, DRIFT_TERMS[(slot, v)])
        for slot, v in need["slots"].items()
        if (slot, v) in DRIFT_TERMS and slot in r.surfaces
    ]
    if not p or not terms:
        return r
    text, used = r.text, dict(r.surfaces)
    for slot, term in terms:
        if rng.random() < p:
            pattern = re.compile(rf"\b{re.escape(used[slot])}\b", re.IGNORECASE)
            if pattern.search(text):
                text, used[slot] = pattern.sub(term, text, count=1), term
    return replace(r, text=text, surfaces=used) if text != r.text else r
