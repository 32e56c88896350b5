"""The catalog of businesses: a seeded draw of names, categories, places, prices, ratings, attributes
and weekly opening hours, plus the functions that ask "is it open at t?" of the whole catalog."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from querytune.hours import MIN
from querytune.world.mechanisms import (
    ATTRIBUTE_CATEGORIES,
    CATALOG_CUISINE_WEIGHTS,
    GENERIC_NAME_SHARE,
    GENERIC_PREFIXES,
    generic_name,
)
from querytune.world.vocab import ATTRIBUTES, CATEGORIES, CITIES, CUISINES, NAME_PARTS, PRICE_WORDS

# hours profile -> list of (probability, weekly pattern); a pattern maps weekday (0=Mon) -> (open, close)
# in minutes after midnight, close may pass 24:00 (a bar closing at 02:00 closes at 26*60).
_H = lambda o, c: (int(o * MIN), int(c * MIN))  # noqa: E731
HOURS_PROFILES: dict[str, list[tuple[float, dict[int, tuple[int, int]]]]] = {
    "restaurant": [
        (0.45, {d: _H(11, 22) for d in range(7)}),
        (0.2, {d: _H(11.5, 23.5 if d >= 4 else 22) for d in range(1, 7)}),
        (0.15, {d: _H(17, 24.5) for d in range(7)}),
        (0.12, {d: _H(7, 15) for d in range(7)}),
        (0.08, {d: _H(0, 24) for d in range(7)}),
    ],
    "cafe": [
        (0.6, {d: _H(6.5, 18) for d in range(7)}),
        (0.3, {d: _H(7, 15) for d in range(6)}),
        (0.1, {d: _H(6, 23) for d in range(7)}),
    ],
    "bar": [
        (0.6, {d: _H(16, 26) for d in range(7)}),
        (0.3, {d: _H(17, 24) for d in range(1, 7)}),
        (0.1, {d: _H(12, 26) for d in range(7)}),
    ],
    "late_day": [
        (0.6, {d: _H(12, 22) for d in range(7)}),
        (0.3, {d: _H(11, 24.5) for d in range(7)}),
        (0.1, {d: _H(14, 20) for d in range(2, 7)}),
    ],
    "trade": [
        (0.55, {d: _H(8, 17) for d in range(5)}),
        (0.25, {d: _H(7, 18) for d in range(6)}),
        (0.2, {d: _H(0, 24) for d in range(7)}),
    ],
    "clinic": [
        (0.6, {d: _H(8, 17) for d in range(5)}),
        (0.3, {d: _H(8, 17) if d < 5 else _H(9, 13) for d in range(6)}),
        (0.1, {d: _H(7, 20) for d in range(7)}),
    ],
    "urgent": [(0.7, {d: _H(8, 20) for d in range(7)}), (0.3, {d: _H(0, 24) for d in range(7)})],
    "pharmacy": [
        (0.6, {d: _H(8, 21) for d in range(7)}),
        (0.25, {d: _H(0, 24) for d in range(7)}),
        (0.15, {d: _H(9, 18) for d in range(6)}),
    ],
    "salon": [
        (0.6, {d: _H(10, 19) for d in range(1, 7)}),
        (0.3, {d: _H(9, 18) for d in range(6)}),
        (0.1, {d: _H(10, 21) for d in range(7)}),
    ],
    "shop": [
        (0.7, {d: _H(8, 18) for d in range(6)}),
        (0.2, {d: _H(7, 19) for d in range(7)}),
        (0.1, {d: _H(0, 24) for d in range(7)}),
    ],
    "gas": [(0.5, {d: _H(6, 23) for d in range(7)}), (0.5, {d: _H(0, 24) for d in range(7)})],
    "always": [(1.0, {d: _H(0, 24) for d in range(7)})],
    "museum": [(0.8, {d: _H(10, 17) for d in range(1, 7)}), (0.2, {d: _H(10, 21) for d in range(7)})],
    "gym": [
        (0.5, {d: _H(5, 23) for d in range(7)}),
        (0.3, {d: _H(0, 24) for d in range(7)}),
        (0.2, {d: _H(6, 21) for d in range(7)}),
    ],
}
CATEGORY_LABELS = {c: c.replace("_", " ") for c in CATEGORIES}


def _title(name: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in name.split())


def _business_name(rng: np.random.Generator, category: str, cuisine: str | None) -> str:
    vertical = CATEGORIES[category][0]
    adjectives, nouns = NAME_PARTS[vertical]
    adj, noun = adjectives[rng.integers(len(adjectives))], nouns[rng.integers(len(nouns))]
    style = rng.integers(4)
    if style == 0 and cuisine:
        return _title(f"{adj} {noun} {cuisine.replace('_', ' ')}")
    if style == 1:
        owner = ["maria", "tony", "lee", "sam", "rosa", "nguyen", "patel", "kim", "joe", "ana", "omar", "chen"][
            rng.integers(12)
        ]
        return _title(f"{owner}'s {noun if vertical != 'food' or not cuisine else cuisine.replace('_', ' ')}")
    if style == 2:
        return _title(f"the {adj} {noun}")
    return _title(f"{adj} {noun}")


def make_catalog(rng: np.random.Generator, per_city: int = 280, market: str = "v1") -> pd.DataFrame:
    """Draw `per_city` x weight-scaled businesses for every city. Deterministic for a given rng state.

    market "v2": restaurants carry fine cuisines (pizza, tacos, dim sum...), attributes occur only for the categories
    that have them (`ATTRIBUTE_CATEGORIES`), and GENERIC_NAME_SHARE of other businesses have generic-word names
    ("Reliable Laundromat"); the column `generic_name` marks them for the world's guideline, and make.py drops it
    before writing (the catalogue a search team has does not say which names read like categories)."""
    v2 = market == "v2"
    categories = list(CATEGORIES)
    cat_p = np.array([CATEGORIES[c][1] for c in categories])
    cat_p /= cat_p.sum()
    weights = CATALOG_CUISINE_WEIGHTS if v2 else {c: CUISINES[c][0] for c in CUISINES}
    cuisines = list(weights)
    cui_p = np.array([weights[c] for c in cuisines])
    cui_p /= cui_p.sum()
    rows = []
    for city, (weight, hoods, _aliases) in CITIES.items():
        n = int(per_city * (0.6 + 0.4 * weight / 4))
        # every category at least once per city, the rest by weight
        drawn = categories + list(rng.choice(categories, size=max(0, n - len(categories)), p=cat_p))
        names_used: set[str] = set()
        for category in drawn:
            vertical, _, profile, price_levels, _ = CATEGORIES[category]
            cuisine = cuisines[rng.choice(len(cuisines), p=cui_p)] if category == "restaurant" else None
            generic = v2 and category != "restaurant" and rng.random() < GENERIC_NAME_SHARE
            if generic:
                surfaces = [w for w in CATEGORIES[category][4][:2] if not w.endswith("s")] or CATEGORIES[category][4][
                    :1
                ]
                name = generic_name(
                    GENERIC_PREFIXES[rng.integers(len(GENERIC_PREFIXES))], surfaces[rng.integers(len(surfaces))]
                )
                generic = name not in names_used
            if not generic:
                name = _business_name(rng, category, cuisine)
                while name in names_used:
                    name = _business_name(rng, category, cuisine)
            names_used.add(name)
            options = HOURS_PROFILES[profile]
            pattern = options[rng.choice(len(options), p=[p for p, _ in options])][1]
            if v2:
                attrs = {
                    a: bool(category in ATTRIBUTE_CATEGORIES[a] and rng.random() < prev)
                    for a, (_, prev, _, _) in ATTRIBUTES.items()
                }
            else:
                attrs = {
                    a: bool(vertical in verts and rng.random() < prev) for a, (verts, prev, _, _) in ATTRIBUTES.items()
                }
            if category in ("plumber", "locksmith", "towing", "urgent_care") and all(
                v == (0, 24 * MIN) for v in pattern.values()
            ):
                attrs["emergency_service"] = True
            rows.append(
                {
                    "name": name,
                    "category": category,
                    "cuisine": cuisine,
                    "vertical": vertical,
                    "city": city,
                    "neighborhood": hoods[rng.integers(len(hoods))],
                    "price_level": int(price_levels[rng.integers(len(price_levels))]),
                    "rating": float(np.clip(np.round(rng.normal(4.1, 0.45), 1), 2.0, 5.0)),
                    "review_count": int(rng.lognormal(4.0, 1.1)) + 1,
                    "hours": json.dumps({str(d): list(v) for d, v in sorted(pattern.items())}),
                    **attrs,
                    **({"generic_name": bool(generic)} if v2 else {}),
                }
            )
    df = pd.DataFrame(rows)
    df.insert(0, "business_id", [f"b{i:05d}" for i in range(len(df))])
    df["text"] = [business_text(r) for r in df.itertuples()]
    return df


def business_text(r) -> str:
    """The text that is embedded and indexed for one business (what a listing page shows)."""
    what = CATEGORY_LABELS[r.category]
    if isinstance(r.cuisine, str):
        what = f"{r.cuisine.replace('_', ' ')} {what}"
    attrs = [ATTRIBUTES[a][3] for a in ATTRIBUTES if getattr(r, a)]
    hood = r.neighborhood.title()
    parts = [f"{r.name}", f"{what} in {hood}, {r.city.title()}", f"{PRICE_WORDS[r.price_level]}, rated {r.rating:.1f}"]
    if attrs:
        parts.append(", ".join(attrs))
    return ". ".join(parts) + "."
