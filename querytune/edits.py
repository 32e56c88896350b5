"""Candidate edits of a model's greedy parse (shared by the miner in training and the exploration bucket in
serving): single-slot changes, each tied to the n-gram of the text that motivates it (its trigger), which the
click-evidence miner (`querytune.train.evidence`) scores and decides.

Candidates (`propose`): for each text, single-slot edits of the greedy parse, each tied to the n-gram of the text
(its trigger) that motivates it:
- `what`: a closed-list "what" value (category, cuisine) that the text writes, or that one of its free n-grams
  embeds near, in place of the parse's value ("pizza" -> cuisine pizza where the parse says italian);
- `swap`: another value of a filter slot the parse holds, on the n-gram that writes the old value, else on each
  free n-gram ("cheap" -> price affordable);
- `add`: a filter the parse lacks, on a free n-gram that embeds near the filter ("for kids" -> kid friendly);
- `name`: the named-business intent with a catalogue name that the text writes ("the gym" as one business, not a
  category). A free n-gram is one whose words no "what"/"where" value of the parse writes, and not all stop words.

With the text's click evidence (`propose(..., targets)`, RFT's `click_values`), also a `click` edit to the value users
clicked (`clicked_values`): per closed-list "what" slot, the value whose businesses hold at least half of the text's
debiased click gains (summed over its logged contexts), where the parse says otherwise, on each free n-gram (none
where a `what` edit already proposes the same). This is how a word no embedding places ("fade shop", 27th nearest to
barber) gets its value once an exploration bucket has shown the right businesses for it; the miner's pooled test
still decides, and RFT writes the accepted ones to the model folder's `click_aliases` with their evidence.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from querytune.schema import WORD, ParseError, Schema, is_grounded, normalize_text

CORE_FILTERS = ("what", "city", "neighborhood", "near_me")  # slots that choose which businesses are candidates at all
KINDS = ("what", "swap", "add", "name", "click")
STOP = frozenset(
    "a an and are around at by can close do find for from get i in is it me my near nearby of on or "
    "place places please some that the this to where with".split()
)


def name_slots(schema: Schema) -> list[str]:
    """Free-text slots that drive the "what" of the search: their values must come from the query."""
    return [s.name for s in schema.slots.values() if s.type == "text" and s.filter == "what"]


class NameBook:
    """The business names of a catalog, to tell a name from a query copied into a name slot.

    >>> book = NameBook(["The Golden Collective", "Urban Escape Room"])
    >>> book.has("the golden collective"), book.has("the goldn collective"), book.has("escape room")
    (True, True, False)
    """

    def __init__(self, names):
        self.names = {normalize_text(str(n)) for n in names}
        self.by_word: dict[str, set[str]] = {}
        for name in self.names:
            for word in name.split():
                self.by_word.setdefault(word, set()).add(name)
        self._seen: dict[str, bool] = {}

    def has(self, value: str) -> bool:
        """Whether `value` is a catalog name, up to the typos `is_grounded` allows (both ways: every word
        of the value is in the name and every word of the name in the value)."""
        value = normalize_text(value)
        if value not in self._seen:
            candidates = set().union(*(self.by_word.get(w, set()) for w in value.split())) if value else set()
            self._seen[value] = value in self.names or any(
                is_grounded(value, name) and is_grounded(name, value) for name in candidates
            )
        return self._seen[value]


@dataclass(frozen=True)
class Edit:
    """One single-slot change of a greedy parse, tied to the trigger n-gram of the text that motivates it. `old` and
    `new` are JSON values (`None`: the slot is absent); a `name` edit sets `slot` (the name slot) and the intent."""

    kind: str
    trigger: str
    slot: str
    old: Any
    new: Any
    intent: str | None = None  # name edits: the named-business intent

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return self.kind, self.trigger, self.slot, json.dumps(self.old), json.dumps(self.new)

    def apply(self, parse: dict[str, Any], schema: Schema) -> dict[str, Any] | None:
        """The parse with this edit made (canonical), or None where the schema refuses the result."""
        if self.kind == "name":
            keep = {
                k: v
                for k, v in parse["slots"].items()
                if k in schema.slots and schema.slots[k].filter in ("city", "neighborhood")
            }
            obj = {"intent": self.intent, "slots": {self.slot: self.new, **keep}}
        else:
            slots = {k: v for k, v in parse["slots"].items() if k != self.slot}
            obj = {"intent": parse["intent"], "slots": slots | ({} if self.new is None else {self.slot: self.new})}
        try:
            return schema.parse(obj).to_dict()
        except ParseError:
            return None


def ngrams(words: list[str], n_max: int) -> list[str]:
    """Every n-gram of 1 to `n_max` words, in order.

    >>> ngrams(["cheap", "thai", "food"], 2)
    ['cheap', 'cheap thai', 'thai', 'thai food', 'food']
    """
    return [" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, min(len(words), i + n_max) + 1)]


class EditProposer:
    """Proposes single-slot edits (module doc). `searcher` (a `querytune.search.Searcher`) gives the catalogue's names
    and the embedder; `seed_rows` (labeled rows: `intent`, `slots`) say which intent holds a business name and which
    numbers a number filter takes."""

    def __init__(
        self, schema: Schema, searcher, seed_rows: list[dict[str, Any]], near: int = 2, min_similarity: float = 0.5
    ):
        self.schema, self.near, self.min_similarity = schema, near, min_similarity
        slots = schema.slots.values()
        self.what = [s for s in slots if s.filter == "what" and s.type == "categorical"]
        self.core = {s.name for s in slots if s.filter in CORE_FILTERS}
        self.filters = [s for s in slots if s.filter and s.filter not in CORE_FILTERS]
        self.names = name_slots(schema)
        by_intent = Counter(r["intent"] for r in seed_rows if any(n in r["slots"] for n in self.names))
        self.name_intent = by_intent.most_common(1)[0][0] if by_intent else None
        numbers = {
            s.name: Counter(r["slots"][s.name] for r in seed_rows if s.name in r["slots"])
            for s in self.filters
            if s.type == "number"
        }
        self.values = {
            s.name: (
                list(s.values)
                if s.type == "categorical"
                else [True]
                if s.type == "boolean"
                else [v for v, _ in numbers.get(s.name, Counter()).most_common(2)]
            )
            for s in self.filters
        }
        catalog = getattr(searcher, "catalog", None)
        self.book = NameBook(catalog["name"]) if catalog is not None and "name" in catalog else None
        # business id -> its value of each closed-list "what" slot the catalogue holds (`clicked_values`)
        self.business_values = {
            s.name: {str(b): v for b, v in zip(catalog["business_id"], catalog[s.name]) if isinstance(v, str) and v}
            for s in self.what
            if catalog is not None and "business_id" in catalog and s.name in catalog
        }
        self.embedder = getattr(searcher, "embedder", None)
        options = [(s.name, v) for s in self.what for v in s.values] + [
            (s.name, v) for s in self.filters for v in self.values[s.name]
        ]
        self._options = options
        self._option_vecs = self._embed([self._describe(slot, v) for slot, v in options]) if options else None

    # -- candidates ----------------------------------------------------------------------------------------
    def _describe(self, slot: str, value: Any) -> str:
        s = self.schema.slots[slot]
        if s.type == "boolean":
            return s.name.replace("_", " ")
        if s.filter == "what":
            return str(value).replace("_", " ")
        return f"{value} {s.name.replace('_', ' ')}"

    def _embed(self, texts: list[str]) -> np.ndarray | None:
        return None if self.embedder is None else self.embedder.encode(texts)

    def free_ngrams(self, text: str, parse: dict[str, Any]) -> list[str]:
        """The n-grams (1-2 words) of `text` whose words no "what"/"where" value of the parse writes,
        not all stop words."""
        words = WORD.findall(normalize_text(text))
        written = set()
        for k, v in parse["slots"].items():
            if k in self.core and isinstance(v, str):
                written |= {w for w in words if self.schema.slots[k].written_in(v, w)}
        spans, run = [], []
        for w in words + [None]:
            if w is None or w in written:
                spans.append(run)
                run = []
            else:
                run.append(w)
        return [g for span in spans for g in ngrams(span, 2) if not set(g.split()) <= STOP]

    def clicked_values(self, parse: dict[str, Any], target: dict[str, Any] | None) -> list[tuple[str, Any]]:
        """(slot, value) of each closed-list "what" slot whose clicked value (module doc) the parse lacks."""
        if not target:
            return []
        gains: dict[str, float] = {}
        for c in target.get("contexts") or [target]:
            g = json.loads(c["gains"]) if isinstance(c["gains"], str) else c["gains"]
            for b, v in g.items():
                gains[b] = gains.get(b, 0.0) + v
        total = sum(gains.values())
        out = []
        for slot, of in self.business_values.items():
            by_value: Counter = Counter()
            for b, v in gains.items():
                if v > 0 and b in of:
                    by_value[of[b]] += v
            if total > 0 and by_value:
                value, weight = by_value.most_common(1)[0]
                if weight >= total / 2 and parse["slots"].get(slot) != value:
                    out.append((slot, value))
        return out

    def propose(
        self,
        texts: list[str],
        greedy: list[dict[str, Any] | None],
        targets: dict[str, dict[str, Any]] | None = None,
    ) -> list[list[Edit]]:
        """Every text's candidate edits (module doc); a text without a valid greedy parse gets none. `targets`
        (normalised text -> its click evidence, `querytune.train.targets.text_targets`): also the clicked values."""
        free = [self.free_ngrams(t, p) if p else [] for t, p in zip(texts, greedy)]
        grams = sorted({g for fs in free for g in fs})
        near: dict[str, list[tuple[str, Any]]] = {}
        if grams and self._option_vecs is not None:
            sims = self._embed(grams) @ self._option_vecs.T
            for g, row in zip(grams, sims):
                top = [i for i in np.argsort(-row)[: 4 * self.near] if row[i] >= self.min_similarity]
                near[g] = [self._options[i] for i in top]
        out = []
        for text, parse, fs in zip(texts, greedy, free):
            if not (
                parse and parse["intent"] in self.schema.intents and self.schema.intents[parse["intent"]].slots != ()
            ):
                out.append([])
                continue
            edits = self._edits(text, parse, fs, near)
            if targets is not None:
                have = {e.key[1:] for e in edits}  # (trigger, slot, old, new), whatever proposed it
                for slot, value in self.clicked_values(parse, targets.get(normalize_text(text))):
                    for g in fs:
                        e = Edit("click", g, slot, parse["slots"].get(slot), value)
                        if e.key[1:] not in have:
                            have.add(e.key[1:])
                            edits.append(e)
            out.append(edits)
        return out

    def _edits(
        self, text: str, parse: dict[str, Any], free: list[str], near: dict[str, list[tuple[str, Any]]]
    ) -> list[Edit]:
        slots, edits = parse["slots"], {}

        def add(edit: Edit) -> None:
            if edit.old != edit.new:
                edits.setdefault(edit.key, edit)

        for s in self.what:  # a closed-list "what" value the text writes
            for v in s.values:
                if slots.get(s.name) != v and s.written_in(v, text):
                    add(Edit("what", normalize_text(str(v)), s.name, slots.get(s.name), v))
        for g in free:
            what = [(slot, v) for slot, v in near.get(g, []) if any(s.name == slot for s in self.what)][: self.near]
            for slot, v in what:  # ... or that a free n-gram embeds near
                add(Edit("what", g, slot, slots.get(slot), v))
            added = [(slot, v) for slot, v in near.get(g, []) if slot not in slots and slot in self.values][: self.near]
            for slot, v in added:
                add(Edit("add", g, slot, None, v))
        for s in self.filters:  # another value of a filter the parse holds
            if s.name not in slots:
                continue
            old = slots[s.name]
            triggers = [g for g in free if s.type == "categorical" and s.written_in(old, g)] or free
            for g in triggers:
                for v in self.values[s.name]:
                    add(Edit("swap", g, s.name, old, v))
        if self.book is not None and self.name_intent and parse["intent"] != self.name_intent and self.names:
            words = WORD.findall(normalize_text(text))
            for g in ngrams(words, 4):
                if not set(g.split()) <= STOP and self.book.has(g):
                    add(Edit("name", g, self.names[0], parse["intent"], g, intent=self.name_intent))
        return list(edits.values())
