"""The queries people type for a hidden need (needs.py): phrasing families, surface forms and noise.

A need is rendered into text by a phrasing family (word order and framing) with surface forms drawn per slot
(synonyms, slang, abbreviations), then noise (typos, dropped words, casing). `covered` says whether the rendering
stays inside what the seed annotators saw (their families and the first surfaces of each list): the seed set is
drawn only from covered renderings, so the log holds phrasings the seed never shows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from querytune.world.needs import CATEGORY_NAMES, CITY_NAMES, V1, Market
from querytune.world.vocab import (
    ATTRIBUTES,
    CATEGORIES,
    CITIES,
    DAY_SURFACES,
    DAYS,
    NEAR_ME,
    OPEN,
    OUT_OF_SCOPE,
    PEOPLE,
    RATING,
    SONGS,
)

# The seed annotators saw every framing but two: slang ("pho spot rn") and telegraphic (shuffled, no connectors).
SEED_FAMILIES = (
    "keyword",
    "need_statement",
    "reversed",
    "question",
    "book_formal",
    "book_casual",
    "named_plain",
    "named_info",
    "oos",
)
ALL_FAMILIES = SEED_FAMILIES + ("slang", "telegraphic")
SURFACE_ZIPF = 1.5  # people use a slot's common forms far more often than its rare ones


@dataclass
class Rendered:
    text: str
    family: str
    covered: bool  # inside the seed annotators' phrasings
    effects: tuple[str, ...] = ()  # of PHRASING_EFFECTS, for the report's slices
    surfaces: dict[str, str] = field(default_factory=dict)  # slot -> the surface the text uses for its value


class Surface:
    """Draws surface forms and remembers whether every draw stayed in the covered (first) part of its list.

    Lists run from common to rare forms and draws follow a Zipf law over that order. The seed annotators
    saw the first `covered_n` forms of a list, never the last one of a list of three or more.
    """

    def __init__(self, rng: random.Random, covered_only: bool):
        self.rng, self.covered_only, self.covered = rng, covered_only, True

    def pick(self, options: list[str], covered_n: int = 3) -> str:
        covered_n = min(covered_n, len(options) - 1 if len(options) >= 3 else len(options))
        n = covered_n if self.covered_only else len(options)
        i = self.rng.choices(range(n), [1 / (k + 1) ** SURFACE_ZIPF for k in range(n)])[0]
        if i >= covered_n:
            self.covered = False
        return options[i]


def _article(phrase: str) -> str:
    """The article a person would put before `phrase` ("a ", "an ", "the " or none for plurals)."""
    first = phrase.split()[0] if phrase.split() else ""
    if first in ("best", "top", "highest", "best rated"):
        return "the "
    if phrase.endswith("s") and not phrase.endswith(("ss", "us", "gas")):
        return ""
    return "an " if first[:1] in "aeio" else "a "


# What the report slices by. typo: one letter dropped, swapped, doubled or changed; abbreviation: a short form
# ("tmrw", "appt", "nyc", "sat"); slang: a slang surface or the slang framing; near_me: "near me" and its kin;
# dropped_words: the telegraphic framing (connectors and "open" dropped, words shuffled).
PHRASING_EFFECTS = ("typo", "abbreviation", "slang", "near_me", "dropped_words")
ABBREVIATIONS = frozenset(
    ["rn", "tmrw", "ppl", "appt", "24h", "24/7", "4+", "til", "thats", "wheres"]
    + [d[:3] for d in DAYS]
    + [s for c in CITIES.values() for s in c[2] if len(s) <= 4 and " " not in s]
)


def _effects(text: str, family: str, slang: bool, near_me: bool, typo: bool) -> tuple[str, ...]:
    words = set(text.lower().replace("?", "").split())
    found = {
        "typo": typo,
        "abbreviation": bool(words & ABBREVIATIONS),
        "slang": slang or family == "slang",
        "near_me": near_me,
        "dropped_words": family == "telegraphic",
    }
    return tuple(e for e in PHRASING_EFFECTS if found[e])


def _typo(rng: random.Random, word: str) -> str:
    i = rng.randrange(1, len(word) - 1)
    op = rng.randrange(4)
    if op == 0:
        return word[:i] + word[i + 1 :]  # drop
    if op == 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]  # swap
    if op == 2:
        return word[:i] + word[i] + word[i:]  # double
    return word[:i] + "aeiou"[rng.randrange(5)] + word[i + 1 :]  # wrong vowel


def render(
    rng: random.Random, need: dict, seed_style: bool = False, noise: float = 0.0, market: Market = V1
) -> Rendered:
    """Turn a need into the text a person types. `seed_style` keeps to the seed annotators' phrasings."""
    s = need["slots"]
    intent = need["intent"]
    sf = Surface(rng, seed_style)
    used: dict[str, str] = {}
    if intent == "out_of_scope":
        template = rng.choice(OUT_OF_SCOPE)
        text = template.format(
            day=rng.choice(["today", "tomorrow", "this weekend"]),
            city=rng.choice(CITY_NAMES),
            cuisine_word=rng.choice(sum((v[1][:1] + v[2][:1] for v in market.cuisines.values()), [])),
            cat_word=rng.choice(sum((CATEGORIES[c][4][:1] for c in CATEGORY_NAMES), [])),
            song=rng.choice(SONGS),
            person=rng.choice(PEOPLE),
            n=rng.choice([3, 5, 10, 26, 100]),
        )
        text, typo = _noise(rng, text, noise)
        return Rendered(text, "oos", True, _effects(text, "oos", False, False, typo))
    if intent == "find_named_business":
        fam = "named_plain" if rng.random() < 0.6 else "named_info"
        parts = [s["business_name"]]
        if "neighborhood" in s:
            parts.append(s["neighborhood"])
        if "city" in s:
            parts.append(used.setdefault("city", sf.pick([s["city"]] + CITIES[s["city"]][2], 1)))
        if fam == "named_info":
            extra = rng.choice(["hours", "phone number", "menu", "reviews", "address", "directions to", "is open"])
            parts = [extra] + parts if extra.startswith(("directions", "is")) else parts + [extra]
        text, typo = _noise(rng, " ".join(parts), noise)
        return Rendered(text, fam, sf.covered, _effects(text, fam, False, False, typo), used)

    # what
    slang = False
    if "cuisine" in s:
        surf_list = market.cuisines[s["cuisine"]][1]
        if not seed_style and rng.random() < 0.15:
            what, slang = rng.choice(market.cuisines[s["cuisine"]][2]), True
        else:
            what = sf.pick(surf_list)
        used["cuisine"] = what
        if not slang and rng.random() < 0.4:
            what += sf.pick([" food", " restaurant", " place", " spot", " joint"], 3)
    else:
        what = used["category"] = sf.pick(CATEGORIES[s["category"]][4])
    pre, post = [], []
    if "price" in s:
        pre.append(used.setdefault("price", sf.pick(market.prices[s["price"]][1])))
    if "min_rating" in s:
        pre.append(used.setdefault("min_rating", sf.pick(RATING[s["min_rating"]])))
    for a in ATTRIBUTES:
        if s.get(a):
            (pre if rng.random() < 0.3 and len(ATTRIBUTES[a][2][0].split()) <= 2 else post).append(
                used.setdefault(a, sf.pick(ATTRIBUTES[a][2]))
            )
    loc = []
    if s.get("near_me"):
        loc.append(sf.pick(NEAR_ME))
    if "neighborhood" in s:
        loc.append(("in " if rng.random() < 0.5 else "") + used.setdefault("neighborhood", s["neighborhood"]))
    if "city" in s:
        city = used["city"] = sf.pick([s["city"]] + CITIES[s["city"]][2])
        loc.append(("in " if rng.random() < 0.5 and "neighborhood" not in s else "") + city)
    when = []
    if "open" in s:
        when.append(used.setdefault("open", sf.pick(OPEN[s["open"]])))
    if "day" in s:
        when.append(used.setdefault("day", sf.pick(DAY_SURFACES[s["day"]])))

    if intent == "book":
        fam = "book_formal" if rng.random() < 0.5 else "book_casual"
        n = s.get("party_size")
        if fam == "book_formal":
            verb = rng.choice(
                ["book", "reserve", "make a reservation at"]
                if s["category"] in ("restaurant", "escape_room", "hotel")
                else ["book an appointment at", "schedule an appointment with", "book"]
            )
            head = f"{verb} {_article(what)}{what}" + (f" for {n}" if n else "")
            text = " ".join([head] + loc + when)
        else:
            head = rng.choice(
                [
                    "table for {n} {what}",
                    "{what} for {n} ppl",
                    "need a {what} appt",
                    "{what} appointment",
                    "get me in at {a}{what}",
                    "{what} reservation",
                ]
            )
            if "{n}" in head and not n:
                head = "{what} reservation"
            text = " ".join([head.format(n=n, what=what, a=_article(what))] + when + loc)
        text, typo = _noise(rng, text, noise)
        return Rendered(
            text, fam, sf.covered and not slang, _effects(text, fam, slang, bool(s.get("near_me")), typo), used
        )

    if seed_style:
        fam = rng.choices(["keyword", "need_statement", "reversed", "question"], [0.4, 0.2, 0.2, 0.2])[0]
    else:
        fam = rng.choices(
            ["keyword", "need_statement", "reversed", "question", "slang", "telegraphic"],
            [0.36, 0.14, 0.16, 0.14, 0.1, 0.1],
        )[0]
    post_txt = [("that is " if fam == "need_statement" and rng.random() < 0.5 else "") + p for p in post]
    if fam == "keyword":
        words = pre + [what] + post_txt + loc + when
    elif fam == "need_statement":
        lead = rng.choice(["looking for", "i need", "need", "find me", "searching for"])
        words = [lead + " " + _article(" ".join(pre + [what])).strip()] + pre + [what] + post_txt + loc + when
    elif fam == "reversed":
        words = [w.removeprefix("in ") for w in loc] + when + pre + [what] + post
    elif fam == "question":
        lead = rng.choice(
            [
                "where can i get",
                "wheres a good",
                "any",
                "is there " + _article(what).strip(),
                "who has the best",
                "what are some",
            ]
        )
        words = [lead] + pre + [what] + post + loc + when
        words[-1] += "?" if rng.random() < 0.5 else ""
    elif fam == "slang":
        words = pre + [what, rng.choice(["spot", "joint", "place", "grub"])] + post + loc + when
        words = [w.replace("right now", "rn").replace("tomorrow", "tmrw") for w in words]
    else:  # telegraphic: dropped words, abbreviations, no connectors
        words = [
            w.removeprefix("in ").removeprefix("that ").replace("open ", "") for w in pre + [what] + post + loc + when
        ]
        rng.shuffle(words)
    text = " ".join(w for w in words if w)
    text, typo = _noise(rng, text, noise)
    return Rendered(
        text,
        fam,
        fam in SEED_FAMILIES and sf.covered and not slang,
        _effects(text, fam, slang, bool(s.get("near_me")), typo),
        used,
    )


def _noise(rng: random.Random, text: str, noise: float) -> tuple[str, bool]:
    """The text with, at rate `noise`, a typo in one long word, and sometimes title or sentence casing;
    whether a typo went in."""
    typo = False
    if noise and rng.random() < noise:
        words = text.split()
        long = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
        if long:
            i = rng.choice(long)
            words[i] = _typo(rng, words[i])
            text, typo = " ".join(words), True
    if rng.random() < 0.06:
        text = text.title() if rng.random() < 0.5 else text.capitalize()
    return text, typo
