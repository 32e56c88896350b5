"""World v2's four mechanisms: where the annotation guideline and the users' needs part ways, as fixed tables.

Frozen before any method was measured on them (eval/RESULTS.md names the commit); change them and every figure
measured on world v2 is void. Each table is in the world's vocabulary; `annotate` is the guideline an annotator
without the catalogue and the later log would apply, `drift_term` the new words the log picks up after the seed
was labeled. Sources for each mechanism are in docs/world.md.

- taxonomy: a dish word's need is the fine cuisine the catalogue carries; the guideline files it under a broad one.
- drift: after the seed's two weeks, new terms ramp in (dishes, category slang, neighbourhood nicknames); the
  guideline's gazetteer lacks them, so an annotator leaves the slot out; the need is the canonical value.
- generic_name: a business named with generic words; the guideline reads its name as a category search.
- filter_guideline: filter words the guideline maps otherwise than users mean them (`FILTER_GUIDELINE`).
"""

from __future__ import annotations

from querytune.world.vocab import CUISINES

MECHANISMS = ("taxonomy", "drift", "generic_name", "filter_guideline")
# share of dev and test rows each mechanism touches (stratified sampling, see make.py)
TEST_SHARES = {"taxonomy": 0.05, "drift": 0.06, "generic_name": 0.03, "filter_guideline": 0.05}

# -- taxonomy: fine cuisine (as the catalogue and the schema spell it) -> the guideline's broad cuisine ----------
FINE_TO_BROAD = {
    "pizza": "italian",
    "ramen": "japanese",
    "sushi": "japanese",
    "tacos": "mexican",
    "pho": "vietnamese",
    "burgers": "american",
    "bbq": "american",
    "dim_sum": "chinese",
}
# v2's cuisines: weight, surfaces, slang; v1's (vocab.CUISINES) where not listed here. The dish words that were slang
# of broad cuisines in v1 ("tacos" for mexican, "pho" for vietnamese, "dim sum" for chinese) are fine cuisines here.
_V2_CHANGED: dict[str, tuple[float, list[str], list[str]]] = {
    "mexican": (3.0, ["mexican", "mexican food"], ["taqueria", "mex"]),
    "italian": (3.0, ["italian", "italian food"], ["pasta"]),
    "chinese": (3.0, ["chinese", "chinese food"], ["chinese takeout"]),
    "vietnamese": (1.2, ["vietnamese", "vietnamese food"], ["banh mi"]),
    "tacos": (2.0, ["tacos", "taco shop"], ["street tacos", "taco spot"]),
    "pho": (1.0, ["pho", "pho shop"], ["pho spot", "noodle house"]),
    "dim_sum": (1.0, ["dim sum", "dumplings"], ["yum cha", "dumpling house"]),
}
_V2_ORDER = [
    "thai",
    "mexican",
    "italian",
    "chinese",
    "japanese",
    "sushi",
    "indian",
    "vietnamese",
    "korean",
    "bbq",
    "pizza",
    "burgers",
    "tacos",
    "pho",
    "dim_sum",
    "mediterranean",
    "greek",
    "french",
    "american",
    "seafood",
    "vegan",
    "ramen",
    "middle_eastern",
    "brunch",
]
V2_CUISINES = {c: _V2_CHANGED.get(c) or CUISINES[c] for c in _V2_ORDER}
# the catalogue's restaurants draw their cuisine from these weights: fine cuisines are 17.2 of 48.2 (36%)
CATALOG_CUISINE_WEIGHTS = {c: w for c, (w, _, _) in V2_CUISINES.items()}

# -- drift: (slot, canonical value) -> the new term, and when it enters the log ----------------------------------
DRIFT_TERMS: dict[tuple[str, str], str] = {
    ("neighborhood", "south congress"): "soco",
    ("neighborhood", "williamsburg"): "wburg",
    ("neighborhood", "koreatown"): "ktown",
    ("neighborhood", "jamaica plain"): "jp",
    ("neighborhood", "old fourth ward"): "o4w",
    ("neighborhood", "north park"): "nopo",
    ("neighborhood", "french quarter"): "the quarter",
    ("neighborhood", "pearl district"): "the pearl",
    ("cuisine", "mexican"): "birria",
    ("cuisine", "chinese"): "hot pot",
    ("cuisine", "thai"): "khao soi",
    ("cuisine", "japanese"): "katsu",
    ("cuisine", "seafood"): "poke",
    ("category", "laundromat"): "washeteria",
    ("category", "barber"): "fade shop",
    ("category", "pharmacy"): "pharm",
    ("category", "tattoo_parlor"): "ink shop",
}
SEED_DAYS = 14  # the seed set is annotated from the log's first two weeks only
DRIFT_RAMP_DAYS, DRIFT_MAX = 14, 0.6  # a term's use grows linearly after SEED_DAYS to DRIFT_MAX of its chances


def drift_rate(day: float) -> float:
    """Chance that a text typed on `day` (days since the log's start) uses the new term where it could.

    >>> drift_rate(3), drift_rate(21), drift_rate(50)
    (0.0, 0.3, 0.6)
    """
    return round(DRIFT_MAX * min(1.0, max(0.0, (day - SEED_DAYS) / DRIFT_RAMP_DAYS)), 6)


# -- generic_name: catalogue names made of generic words -----------------------------------------------------------
GENERIC_NAME_SHARE = 0.10  # of the catalogue's non-restaurant businesses
GENERIC_PREFIXES = [
    "the",
    "reliable",
    "city",
    "quality",
    "friendly",
    "downtown",
    "family",
    "classic",
    "original",
    "best",
]


def generic_name(prefix: str, category_surface: str) -> str:
    """'reliable' + 'laundromat' -> 'Reliable Laundromat'."""
    return " ".join(w[:1].upper() + w[1:] for w in f"{prefix} {category_surface}".split())


# -- filter_guideline: (slot, need value, surface typed) -> what the guideline labels instead -------------------------
# None: the guideline leaves the slot out. A surface of "*" matches any surface of that need value.
FILTER_GUIDELINE: dict[tuple[str, object, str], object] = {
    ("open", "late", "late night"): "now",  # "late night" read as open now; users want open at 23:00
    ("kid_friendly", True, "good for kids"): None,  # "with/for kids" read as who comes along, not a requirement
    ("kid_friendly", True, "that takes kids"): None,
    ("kid_friendly", True, "for kids"): None,
    ("price", "affordable", "*"): "cheap",  # "cheap" read as the lowest tier; users accept the two lowest
    ("min_rating", 4.0, "good"): None,  # "good" read as praise, not a rating floor
    ("min_rating", 4.0, "decent"): None,
}
# v2's prices: "affordable" (the two lowest tiers) is what most people typing "cheap" mean
V2_PRICES: dict[str, tuple[float, list[str]]] = {
    "cheap": (0.2, ["budget", "cheapest", "dirt cheap", "bargain"]),
    "affordable": (0.4, ["cheap", "affordable", "inexpensive", "cheap eats", "not expensive"]),
    "moderate": (0.15, ["moderately priced", "mid priced", "reasonably priced", "mid range"]),
    "expensive": (0.25, ["upscale", "fancy", "high end", "fine dining", "luxury", "splurge"]),
}

# -- realism: which constraints occur for which categories (v2's catalogue draws attributes from this table) ----
FOOD = ("restaurant", "cafe", "bakery", "ice_cream_shop", "food_truck", "juice_bar")
HEALTH = (
    "dentist",
    "pediatrician",
    "urgent_care",
    "pharmacy",
    "optometrist",
    "chiropractor",
    "physical_therapist",
    "dermatologist",
)
ATTRIBUTE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "kid_friendly": FOOD
    + (
        "movie_theater",
        "bowling_alley",
        "escape_room",
        "museum",
        "pediatrician",
        "dentist",
        "optometrist",
        "hair_salon",
        "barber",
        "hotel",
    ),
    "outdoor_seating": ("restaurant", "cafe", "bar", "brewery", "food_truck", "ice_cream_shop", "juice_bar"),
    "delivery": ("restaurant", "cafe", "bakery", "juice_bar", "pharmacy"),
    "vegan_options": ("restaurant", "cafe", "bakery", "juice_bar", "food_truck", "ice_cream_shop"),
    "accepts_insurance": HEALTH + ("veterinarian",),
    "emergency_service": (
        "plumber",
        "electrician",
        "locksmith",
        "hvac",
        "roofer",
        "pest_control",
        "urgent_care",
        "veterinarian",
        "towing",
        "dentist",
        "auto_repair",
    ),
    "pet_friendly": (
        "restaurant",
        "cafe",
        "bar",
        "brewery",
        "hotel",
        "motel",
        "bed_and_breakfast",
        "laundromat",
        "pet_store",
    ),
    "wheelchair_accessible": FOOD
    + HEALTH
    + (
        "bar",
        "brewery",
        "movie_theater",
        "bowling_alley",
        "museum",
        "hotel",
        "motel",
        "gym",
        "yoga_studio",
        "comedy_club",
        "karaoke",
    ),
    "free_wifi": ("restaurant", "cafe", "bakery", "hotel", "motel", "bed_and_breakfast", "laundromat"),
    "walk_ins": (
        "hair_salon",
        "barber",
        "nail_salon",
        "massage",
        "tattoo_parlor",
        "urgent_care",
        "optometrist",
        "auto_repair",
        "tire_shop",
        "car_wash",
    ),
}

# -- the logging ranker's randomisation --------------------------------------------------------------------------
SWAP_P = 0.05  # each of positions 1-9 is swapped, independently, with a business from ranks 10-29
SWAP_POOL = (10, 30)


def annotate(need: dict, surfaces: dict[str, str], generic: dict[str, str]) -> tuple[dict, list[str]]:
    """What the guideline labels for a need typed with `surfaces` (slot -> the surface the text uses), and the
    mechanisms that make it differ. `generic`: lower-cased generic business name -> its category.

    >>> annotate({"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "pizza"}},
    ...          {"cuisine": "pizza"}, {})
    ({'intent': 'find_business', 'slots': {'category': 'restaurant', 'cuisine': 'italian'}}, ['taxonomy'])
    >>> annotate({"intent": "find_named_business", "slots": {"business_name": "reliable laundromat", "city": "austin"}},
    ...          {}, {"reliable laundromat": "laundromat"})
    ({'intent': 'find_business', 'slots': {'category': 'laundromat', 'city': 'austin'}}, ['generic_name'])
    """
    slots, tags = dict(need["slots"]), []
    intent = need["intent"]
    if intent == "find_named_business" and slots.get("business_name") in generic:
        category = generic[slots.pop("business_name")]
        intent, slots, tags = "find_business", {"category": category, **slots}, ["generic_name"]
    if slots.get("cuisine") in FINE_TO_BROAD:
        slots["cuisine"] = FINE_TO_BROAD[slots["cuisine"]]
        tags.append("taxonomy")
    for slot, value in list(slots.items()):
        surface = surfaces.get(slot)
        for key in ((slot, value, surface), (slot, value, "*")):
            if key in FILTER_GUIDELINE:
                if FILTER_GUIDELINE[key] is None:
                    slots.pop(slot)
                else:
                    slots[slot] = FILTER_GUIDELINE[key]
                tags.append("filter_guideline")
                break
    for slot, value in need["slots"].items():
        if (slot, value) in DRIFT_TERMS and surfaces.get(slot) == DRIFT_TERMS[(slot, value)]:
            slots.pop(slot, None)  # the guideline's gazetteer has no such word: the annotator leaves it out
            tags.append("drift")
    return {"intent": intent, "slots": dict(sorted(slots.items()))}, sorted(set(tags), key=MECHANISMS.index)
