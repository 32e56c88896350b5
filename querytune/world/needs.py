"""Hidden user needs: the vocabulary they are drawn from (a market), the drawing, and a need's graded relevance.

A need is a gold parse (intent + canonical slots, exactly what the query says); queries.py turns it into the
text a person types. Relevance grades the catalog's businesses against a need at its time and place.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from querytune.hours import MIN, always_open, open_at, open_on, resolve_weekday
from querytune.world.catalog import HOURS_PROFILES
from querytune.world.mechanisms import ATTRIBUTE_CATEGORIES, V2_CUISINES, V2_PRICES
from querytune.world.vocab import ATTRIBUTES, CATEGORIES, CITIES, CUISINES, DAYS, PRICES

BOOKABLE = (
    "restaurant",
    "hair_salon",
    "barber",
    "nail_salon",
    "spa",
    "massage",
    "dentist",
    "optometrist",
    "chiropractor",
    "veterinarian",
    "pet_groomer",
    "hotel",
    "escape_room",
    "yoga_studio",
    "auto_repair",
)
CATEGORY_NAMES = [c for c in CATEGORIES]
_CAT_W = [CATEGORIES[c][1] if c != "restaurant" else 18.0 for c in CATEGORY_NAMES]  # cuisines add restaurant demand
CITY_NAMES = list(CITIES)
_CITY_W = [CITIES[c][0] for c in CITY_NAMES]
OPEN_WEIGHTS = {"now": 0.55, "late": 0.3, "24h": 0.15}


@dataclass(frozen=True)
class Market:
    """The vocabulary needs are drawn from and typed in: v1's, or v2's (fine cuisines, "affordable", and constraints
    only where they occur for the category: no "brewery 24h", no "dog boarding that takes insurance")."""

    name: str
    cuisines: dict[str, tuple[float, list[str], list[str]]]  # cuisine -> (weight, surfaces, slang)
    prices: dict[str, tuple[float, list[str]]]  # price value -> (weight, surfaces)
    by_category: bool  # constraints drawn as they occur for the category (ATTRIBUTE_CATEGORIES, hours profiles)

    def attributes(self, category: str) -> list[str]:
        if self.by_category:
            return [a for a in ATTRIBUTES if category in ATTRIBUTE_CATEGORIES[a]]
        return [a for a, (verts, *_r) in ATTRIBUTES.items() if CATEGORIES[category][0] in verts]

    def open_values(self, category: str) -> list[str]:
        if not self.by_category:
            return list(OPEN_WEIGHTS)
        patterns = [p for _, p in HOURS_PROFILES[CATEGORIES[category][2]]]
        late = any(c >= 23 * MIN for p in patterns for _, c in p.values())
        always = any(all(v == (0, 24 * MIN) for v in p.values()) and len(p) == 7 for p in patterns)
        return ["now"] + (["late"] if late else []) + (["24h"] if always else [])


V1 = Market(
    "v1", CUISINES, {k: (w, PRICES[k][1]) for k, w in zip(("cheap", "moderate", "expensive"), (0.6, 0.15, 0.25))}, False
)
V2 = Market("v2", V2_CUISINES, V2_PRICES, True)


def sample_need(
    rng: random.Random, user_city: str, n_constraints_p=(0.35, 0.35, 0.2, 0.1), market: Market = V1
) -> dict:
    """A hidden need for a user in `user_city`: {"intent", "slots"} with canonical values."""
    u = rng.random()
    if u < 0.09:
        return {"intent": "out_of_scope", "slots": {}}
    if u < 0.21:
        return {"intent": "find_named_business", "slots": {}}  # name filled against the catalog by the caller
    intent = "book" if u < 0.31 else "find_business"
    slots: dict = {}
    if intent == "book":
        slots["category"] = rng.choice(BOOKABLE)
    else:
        slots["category"] = rng.choices(CATEGORY_NAMES, _CAT_W)[0]
    vertical = CATEGORIES[slots["category"]][0]
    if slots["category"] == "restaurant" and rng.random() < 0.8:
        slots["cuisine"] = rng.choices(list(market.cuisines), [w for w, _, _ in market.cuisines.values()])[0]
    loc = rng.random()
    if loc < 0.32:
        slots["near_me"] = True
    elif loc < 0.58:
        slots["city"] = user_city if rng.random() < 0.45 else rng.choices(CITY_NAMES, _CITY_W)[0]
        if rng.random() < 0.25:
            slots["neighborhood"] = rng.choice(CITIES[slots["city"]][1])
    elif loc < 0.72:
        slots["neighborhood"] = rng.choice(CITIES[user_city][1])
    if intent == "book":
        if slots["category"] in ("restaurant", "escape_room") and rng.random() < 0.6:
            slots["party_size"] = rng.choice([2, 2, 2, 3, 4, 4, 5, 6, 8])
        if rng.random() < 0.7:
            slots["day"] = rng.choice(DAYS + ["today", "tomorrow", "tomorrow", "weekend"])
        return {"intent": intent, "slots": slots}
    k = rng.choices(range(len(n_constraints_p)), n_constraints_p)[0]
    options = ["open", "day", "min_rating"] + market.attributes(slots["category"])
    if vertical in ("food", "lodging", "beauty", "home", "fitness"):
        options += ["price", "price"]
    if vertical == "food":
        options += ["open"]
    for _ in range(k):
        opt = rng.choice(options)
        if opt == "open" and "open" not in slots:
            values = market.open_values(slots["category"])
            slots["open"] = rng.choices(values, [OPEN_WEIGHTS[v] for v in values])[0]
        elif opt == "day" and "day" not in slots and slots.get("open") != "now":
            slots["day"] = rng.choice(DAYS + ["today", "tomorrow", "weekend", "weekend"])
        elif opt == "price":
            slots["price"] = rng.choices(list(market.prices), [w for w, _ in market.prices.values()])[0]
        elif opt == "min_rating":
            slots["min_rating"] = rng.choice([4.5, 4.5, 4.0])
        elif opt in ATTRIBUTES:
            slots[opt] = True
    return {"intent": intent, "slots": slots}


def named_need(rng: random.Random, user_city: str, business: dict) -> dict:
    slots = {"business_name": business["name"].lower()}
    if business["city"] != user_city or rng.random() < 0.15:
        slots["city"] = business["city"]
    if rng.random() < 0.15:
        slots["neighborhood"] = business["neighborhood"]
    return {"intent": "find_named_business", "slots": slots}


def constraint_masks(need: dict, cat: dict, idx: np.ndarray, user_city: str, weekday: int, minute: int):
    """For the businesses `idx` (already in the right city): the "what"+"where" mask, and one mask per other
    constraint. `cat` holds catalog columns as numpy arrays."""
    s = need["slots"]
    base = np.ones(len(idx), dtype=bool)
    if "category" in s:
        base &= cat["category"][idx] == s["category"]
    if "cuisine" in s:
        base &= cat["cuisine"][idx] == s["cuisine"]
    if "neighborhood" in s:
        base &= cat["neighborhood"][idx] == s["neighborhood"]
    others = []
    hours = cat["hours"][idx]
    if "open" in s:
        if s["open"] == "now":
            others.append(open_at(hours, weekday, minute))
        elif s["open"] == "late":
            days = resolve_weekday(s["day"], weekday) if "day" in s else [weekday]
            others.append(np.any([open_at(hours, d, 23 * MIN) | open_at(hours, (d + 1) % 7, 30) for d in days], axis=0))
        else:
            others.append(always_open(hours))
    if "day" in s and s.get("open") not in ("late",):
        others.append(np.any([open_on(hours, d) for d in resolve_weekday(s["day"], weekday)], axis=0))
    if "price" in s:
        others.append(np.isin(cat["price_level"][idx], PRICES[s["price"]][0]))
    if "min_rating" in s:
        others.append(cat["rating"][idx] >= s["min_rating"])
    for a in ATTRIBUTES:
        if s.get(a):
            others.append(cat[a][idx])
    return base, others


def graded_relevance(
    need: dict, cat: dict, city_rows: dict, user_city: str, weekday: int, minute: int
) -> dict[int, int]:
    """Row index -> grade. 2: satisfies every constraint; 1: right kind and place, misses exactly one
    other constraint; unlisted: 0. Named-business needs: the named business (grade 2)."""
    s = need["slots"]
    if need["intent"] == "out_of_scope":
        return {}
    city = s.get("city", user_city)
    idx = city_rows[city]
    if need["intent"] == "find_named_business":
        hit = idx[cat["name_lower"][idx] == s["business_name"]]
        return {int(i): 2 for i in hit}
    base, others = constraint_masks(need, cat, idx, user_city, weekday, minute)
    if others:
        fails = np.sum([~m for m in others], axis=0)
    else:
        fails = np.zeros(len(idx), dtype=int)
    rel = {}
    for i, ok, f in zip(idx[base], base[base], fails[base]):
        if f == 0:
            rel[int(i)] = 2
        elif f == 1:
            rel[int(i)] = 1
    return rel
