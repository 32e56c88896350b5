"""The retrieval-success reward: a parse is good when the search it produces finds what users clicked.

`RetrievalReward` is a plain callable in TRL's reward-function shape
(`reward(prompts=..., completions=..., **dataset_columns) -> list[float]`), used as is by GRPO and, through
`score`, to rank the sampled parses that become DPO pairs.

A completion earns:
- `INVALID` (-1.0, below any valid parse) when it is not one strict JSON object `{"intent", "slots"}`
  that fits the schema: broken JSON, repeated keys (two "intent"s, a slot twice), an intent or slot the
  schema lacks, a value outside a slot's list, text after the object, or more than `max_chars` characters;
- 0.0 for an intent that takes no slots (out of scope: no search runs), and when a name slot (a free-text slot that drives the "what" of the search, e.g. `business_name`)
  holds a value that the query does not write (up to typos, `querytune.schema.is_grounded`), and likewise
  for the schema's `grounded` slots: the model must not learn to emit the clicked business's name or
  a made-up neighbourhood; and when a name slot names no business of the index's catalog (up to typos):
  copying the query into `business_name` ("escape room" as a business called "escape room") would
  otherwise turn every category search into a name search that scores like the raw query;
- otherwise NDCG@k of its structured search against the query's clicks, in [0, 1]. Clicks are graded:
  a clicked business is grade 1, and grade 2 when it holds at least half the clicks of the query's most
  clicked business (and two or more clicks): what many users picked counts most.

Searches and scores are cached for the life of the object (one training run).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from querytune.metrics import ndcg_at_k
from querytune.schema import ParseError, Schema, is_grounded, normalize_text

INVALID = -1.0


def click_grades(clicks: dict[str, int]) -> dict[str, int]:
    """Click counts per business -> relevance grades (1, or 2 for the query's most chosen businesses).

    >>> click_grades({"b1": 6, "b2": 3, "b3": 1})
    {'b1': 2, 'b2': 2, 'b3': 1}
    >>> click_grades({"b1": 1})
    {'b1': 1}
    """
    if not clicks:
        return {}
    top = max(clicks.values())
    return {b: 2 if n >= max(2, top / 2) else 1 for b, n in clicks.items() if n > 0}


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ParseError(f"repeated key(s): {', '.join(sorted({k for k in keys if keys.count(k) > 1}))}")
    return dict(pairs)


def strict_parse(schema: Schema, completion: str, max_chars: int = 400):
    """The schema parse of a completion, or ParseError saying why it is not one strict, in-schema object."""
    text = completion.strip()
    if len(text) > max_chars:
        raise ParseError(f"over-long output ({len(text)} > {max_chars} characters)")
    try:
        obj = json.loads(text, object_pairs_hook=_no_repeats)
    except json.JSONDecodeError as e:
        raise ParseError(f"not one JSON object: {e.msg} at char {e.pos}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("intent"), str) or not isinstance(obj.get("slots"), dict):
        raise ParseError('expected {"intent": "<one intent>", "slots": {...}}')
    return schema.parse(obj)


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
                is_grounded(value, name) and is_grounded(name, value) for name in candidates)
        return self._seen[value]


class RetrievalReward:
    """Retrieval-success reward over a `Searcher`; see the module docstring.

    >>> from querytune.schema import load_schema
    >>> class Shelf:  # a two-business "index" that finds b1 for Thai food and b2 for anything else
    ...     def search(self, parse, ctx, k=10, fallback_text=None):
    ...         return ["b1", "b2"] if parse.slots.get("cuisine") == "thai" else ["b2", "b1"]
    >>> reward = RetrievalReward(Shelf(), load_schema())
    >>> ctx = {"user_city": "austin", "timestamp": "2026-09-01T19:00:00", "clicks": {"b1": 4}}
    >>> good = '{"intent":"find_business","slots":{"category":"restaurant","cuisine":"thai"}}'
    >>> worse = '{"intent":"find_business","slots":{"category":"restaurant"}}'
    >>> reward(prompts=["p", "p"], completions=[good, worse], query=["thai food"] * 2,
    ...        user_city=[ctx["user_city"]] * 2, timestamp=[ctx["timestamp"]] * 2, clicks=[ctx["clicks"]] * 2)
    [1.0, 0.63093]
    >>> reward.score("thai food", '{"intent":"find_business","intent":"book","slots":{}}', **ctx)
    -1.0
    """

    __name__ = "retrieval_reward"  # TRL logs a reward function under its name

    def __init__(self, searcher, schema: Schema, k: int = 10, max_chars: int = 400):
        self.searcher, self.schema, self.k, self.max_chars = searcher, schema, k, max_chars
        self.names = name_slots(schema)
        self.written = set(self.names) | {s.name for s in schema.slots.values() if s.grounded}  # values the query must write
        catalog = getattr(searcher, "catalog", None)  # a Searcher has one; a stand-in in a doctest may not
        self.known = NameBook(catalog["name"]) if catalog is not None and "name" in catalog else None
        self._searches: dict[tuple, list[str]] = {}
        self.calls = self.search_calls = 0

    def score(self, query: str, completion: str, user_city: str, timestamp: str | datetime, clicks: dict[str, int] | str) -> float:
        """Reward of one completion for one logged query (see the module docstring)."""
        from querytune.search import Context

        self.calls += 1
        try:
            parse = strict_parse(self.schema, completion, self.max_chars)
        except ParseError:
            return INVALID
        if self.schema.intents[parse.intent].slots == ():
            return 0.0  # an intent that takes no slots (out of scope) runs no search
        if any(not self.schema.slots[n].written_in(v, query) for n, v in parse.slots.items() if n in self.written):
            return 0.0  # a name (or grounded value) the query does not write: made up, or the clicked business's
        if self.known is not None and any(n in parse.slots and not self.known.has(str(parse.slots[n])) for n in self.names):
            return 0.0  # a name no business has: the query copied into a name slot
        if isinstance(clicks, str):
            clicks = json.loads(clicks)
        grades = click_grades(clicks)
        if not grades:
            return 0.0
        ts = timestamp if isinstance(timestamp, datetime) else datetime.fromisoformat(str(timestamp))
        key = (parse.to_json(), user_city, ts.isoformat(timespec="minutes"))
        ranked = self._searches.get(key)
        if ranked is None:
            self.search_calls += 1
            ranked = self._searches[key] = self.searcher.search(parse, Context(user_city, ts), k=self.k)
        return round(ndcg_at_k(ranked, grades, self.k), 5)

    def __call__(self, prompts=None, completions=None, query=None, user_city=None, timestamp=None, clicks=None, contexts=None,
                 **_) -> list[float]:
        """TRL's reward shape. With a `contexts` column (JSON lists of {user_city, timestamp, clicks}), each query is
        scored in all of them (`score_in_contexts`); otherwise in its one user_city/timestamp/clicks."""
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # plain or conversational
        if contexts is not None:
            return [score_in_contexts(self.score, q, c, json.loads(x) if isinstance(x, str) else x)
                    for q, c, x in zip(query, texts, contexts, strict=True)]
        return [self.score(q, c, u, t, k) for q, c, u, t, k in zip(query, texts, user_city, timestamp, clicks, strict=True)]


def score_in_contexts(score, query: str, completion: str, contexts: list[dict[str, Any]]) -> float:
    """`score` (a reward's `score(query, completion, user_city, timestamp, clicks)`) of one completion of a query
    typed in several contexts (one per user city, clicks summed over its rows), averaged with each context's
    clicks as its weight. A popular query is typed in many cities: its parse is judged on every user's clicks,
    not on one city's few (a parse that drops "atx" from "dentist atx" loses only where users are outside Austin).

    >>> by_city = lambda q, c, user_city, timestamp, clicks: 1.0 if user_city == "austin" else 0.0
    >>> score_in_contexts(by_city, "dentist atx", "{}", [
    ...     {"user_city": "austin", "timestamp": "2026-09-01T12:00", "clicks": {"b1": 3}},
    ...     {"user_city": "boston", "timestamp": "2026-09-01T12:00", "clicks": {"b1": 1}}])
    0.75
    """
    total = weighted = 0.0
    for ctx in contexts:
        clicks = json.loads(ctx["clicks"]) if isinstance(ctx["clicks"], str) else ctx["clicks"]
        w = max(1, sum(clicks.values()))
        weighted += w * score(query, completion, ctx["user_city"], ctx["timestamp"], clicks)
        total += w
    return round(weighted / total, 5) if total else 0.0
