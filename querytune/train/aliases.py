"""Alias tables a model folder carries: the names for grounded values that its own training labels support.

The parser keeps a value of a `grounded` slot (city, neighbourhood, business name) only when the query writes
it or one of the slot's aliases (`Schema.ground`), so a nickname the schema does not list ("soco" for south
congress) would be dropped from every parse, however well the model learned it. `mine_aliases` decides which
word n-grams of the labeled texts stand for such a value: an n-gram (1-3 words) of a text whose label holds a
grounded categorical value the text does not write, that is not itself a value or alias of any categorical
slot, becomes an alias when at least `min_rows` labeled rows hold both it and the value, and at least
`min_precision` of the labeled rows whose text holds it carry that value. An alias the schema already has is
never overridden. `merge_aliases` puts a table into a schema; SFT saves that schema in the model folder, which
every backend loads, and lists the mined aliases with their support in `querytune.json`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

from querytune.labeled import LabeledRow
from querytune.schema import WORD, Schema, normalize_text


def ngrams(text: str, longest: int = 3) -> set[str]:
    words = WORD.findall(normalize_text(text))
    return {" ".join(words[i : i + n]) for n in range(1, longest + 1) for i in range(len(words) - n + 1)}


def _inside(short: str, long: str) -> bool:
    return short != long and f" {short} " in f" {long} "


def mine_aliases(
    rows: list[LabeledRow], schema: Schema, min_rows: int = 2, min_precision: float = 0.8
) -> dict[str, dict[str, dict[str, Any]]]:
    """{slot: {alias: {"value", "rows", "precision"}}} supported by `rows` (see the module docstring).

    >>> from querytune.schema_file import schema_from_dict
    >>> s = schema_from_dict({"intents": [{"name": "find"}], "slots": [
    ...     {"name": "hood", "type": "categorical", "values": ["south congress", "east austin"], "grounded": True}]})
    >>> pairs = [("tacos soco", "south congress"), ("soco bars", "south congress"),
    ...          ("late coffee soco", "south congress"), ("ea tacos", "east austin"),
    ...          ("bars downtown", "south congress"), ("bars downtown", "east austin")]
    >>> mine_aliases([LabeledRow(t, t, "find", {"hood": v}) for t, v in pairs], s)  # "ea": once; "downtown": either
    {'hood': {'soco': {'value': 'south congress', 'rows': 3, 'precision': 1.0}}}
    """
    forms = {
        normalize_text(f) for s in schema.slots.values() if s.type == "categorical" for f in [*s.values, *s.aliases]
    }
    grams = [ngrams(r.text) for r in rows]
    candidates = set()  # (slot, value, n-gram) seen where the label holds a value its text does not write
    for r, gs in zip(rows, grams):
        for name, value in r.slots.items():
            slot = schema.slots[name]
            if slot.grounded and slot.type == "categorical" and not slot.written_in(value, r.text):
                candidates |= {(name, value, g) for g in gs if g not in forms and g not in slot.aliases}
    wanted = {g for _, _, g in candidates}
    holds = Counter(g for gs in grams for g in gs & wanted)
    both = Counter(
        (name, value, g)
        for r, gs in zip(rows, grams)
        for name, value in r.slots.items()
        for g in gs & wanted
        if (name, value, g) in candidates
    )
    accepted = {
        (name, g): (value, n) for (name, value, g), n in both.items() if n >= min_rows and n / holds[g] >= min_precision
    }
    mined: dict[str, dict[str, dict[str, Any]]] = {}
    for (name, g), (value, n) in sorted(
        accepted.items(), key=lambda kv: (-len(kv[0][1].split()), kv[0])
    ):  # longest first
        same = [(h, m) for (other, h), (v, m) in accepted.items() if other == name and v == value]
        if any(_inside(g, h) and m == n for h, m in same):
            continue  # only ever seen inside a longer alias ("k" of "k town"): that one stands for the value
        if any(_inside(h, g) and m > n for h, m in same):
            continue  # a shorter alias inside it is seen more widely ("soco" of "bars soco"): it covers this one
        mined.setdefault(name, {})[g] = {"value": value, "rows": n, "precision": round(n / holds[g], 3)}
    return mined


def merge_aliases(schema: Schema, tables: dict[str, dict[str, Any]]) -> Schema:
    """`schema` with `tables` ({slot: {alias: value or {"value": ...}}}) added to its slots' aliases; an alias the
    schema has, a slot it lacks or a value no longer among the slot's values is left out."""
    slots = dict(schema.slots)
    for name, table in tables.items():
        slot = slots.get(name)
        if slot is None or slot.type != "categorical":
            continue
        added = {normalize_text(a): v["value"] if isinstance(v, dict) else v for a, v in table.items()}
        slots[name] = replace(slot, aliases={a: v for a, v in added.items() if v in slot.values} | slot.aliases)
    return replace(schema, slots=slots)
