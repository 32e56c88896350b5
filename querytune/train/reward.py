"""The retrieval-success reward: a parse is good when the search it produces finds what users clicked.

`RetrievalReward` is a plain callable in TRL's reward-function shape
(`reward(prompts=..., completions=..., **dataset_columns) -> list[float]`), used as is by GRPO and, through
`score`, to rank the sampled parses that become DPO pairs.

A completion is read in the format it was written in (`querytune.runtime.formats`: JSON unless told; GRPO's policy
writes its folder's format, and DPO's candidates and pairs are held as JSON). It earns:
- `INVALID` (-1.0, below any valid parse) when it is not one strict parse that fits the schema: broken JSON or
  compact text, repeated keys (two "intent"s, a slot twice), an intent or slot the schema lacks, a value outside
  a slot's list, text after the parse, or more than `max_chars` characters;
- 0.0 for an intent that takes no slots (out of scope: no search runs), and when a name slot (a free-text
  slot that drives the "what" of the search, e.g. `business_name`) holds a value that the query does not
  write (`Slot.written_in`: the value or one of the schema's aliases, up to typos), and likewise for the
  schema's `grounded` slots: the model must not learn to emit the clicked business's name or
  a made-up neighbourhood; and when a name slot names no business of the index's catalog (up to typos):
  copying the query into `business_name` ("escape room" as a business called "escape room") would
  otherwise turn every category search into a name search that scores like the raw query;
- otherwise NDCG@k of its structured search against the position-debiased click evidence of the text
  (`querytune.train.clicks`: inverse-propensity-scored clicks, Joachims et al., WSDM 2017) in one logged context: the
  search runs in that context's city at its time, and its ranking is condensed to the businesses the log
  showed for the text in that city before scoring (`condensed_ndcg`, Sakai, SIGIR 2007), so a parse is not
  punished for good businesses the old ranker never showed. A text's score is the mean over its logged
  contexts (`score_in_contexts`).

Searches are cached for the life of the object (one training run).
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from functools import partial
from typing import Any

from querytune.edits import NameBook, name_slots
from querytune.runtime.formats import WRITES, read
from querytune.schema import ParseError, Schema

INVALID = -1.0


def condensed_ndcg(ranked: list[str], gains: dict[str, float], k: int = 10) -> float:
    """NDCG@k of `ranked` condensed to the judged businesses (the keys of `gains`): unjudged ones are removed
    before scoring, so a ranking is not punished for businesses nobody was shown (the condensed-list measures
    of Sakai, "Alternatives to Bpref", SIGIR 2007). Linear gains (debiased click rates), log2 discounts.

    >>> condensed_ndcg(["never_shown", "b2", "b1"], {"b1": 0.8, "b2": 0.0})
    0.63093
    >>> condensed_ndcg(["never_shown"], {"b1": 0.8}), condensed_ndcg(["b1"], {"b1": 0.0})
    (0.0, 0.0)
    """
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(gains.values(), reverse=True)[:k]))
    if ideal <= 0:
        return 0.0
    condensed = [b for b in ranked if b in gains][:k]
    return round(sum(gains[b] / math.log2(i + 2) for i, b in enumerate(condensed)) / ideal, 5)


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ParseError(f"repeated key(s): {', '.join(sorted({k for k in keys if keys.count(k) > 1}))}")
    return dict(pairs)


def strict_parse(schema: Schema, completion: str, max_chars: int = 400, fmt: str = "json"):
    """The schema parse of a completion in format `fmt`, or ParseError saying why it is not one strict, in-schema
    parse (a compact completion is read by `querytune.runtime.formats.read`, which refuses a slot written twice).

    >>> from querytune.schema_file import load_schema
    >>> strict_parse(load_schema(), "find_business cuisine=thai near_me", fmt="compact").to_json()
    '{"intent":"find_business","slots":{"cuisine":"thai","near_me":true}}'
    """
    text = completion.strip()
    if len(text) > max_chars:
        raise ParseError(f"over-long output ({len(text)} > {max_chars} characters)")
    if WRITES[fmt] != "json":
        return read(fmt, schema, text)
    try:
        obj = json.loads(text, object_pairs_hook=_no_repeats)
    except json.JSONDecodeError as e:
        raise ParseError(f"not one JSON object: {e.msg} at char {e.pos}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("intent"), str) or not isinstance(obj.get("slots"), dict):
        raise ParseError('expected {"intent": "<one intent>", "slots": {...}}')
    return schema.parse(obj)


class RetrievalReward:
    """Retrieval-success reward over a `Searcher`; see the module docstring. `depth`: the parse's top results
    the condensed list is taken from (default 2k): from its whole ranking, a parse that drops the "what" would
    still order the few businesses the log showed and score like the right one.

    >>> from querytune.schema_file import load_schema
    >>> class Shelf:  # a two-business "index" that finds b1 for Thai food and b2 for anything else
    ...     def search(self, parse, ctx, k=10, fallback_text=None):
    ...         return ["b1", "b2"] if parse.slots.get("cuisine") == "thai" else ["b2", "b1"]
    >>> reward = RetrievalReward(Shelf(), load_schema())
    >>> ctx = {"user_city": "austin", "timestamp": "2026-09-01T19:00:00", "gains": {"b1": 0.8, "b2": 0.0}}
    >>> good = '{"intent":"find_business","slots":{"category":"restaurant","cuisine":"thai"}}'
    >>> worse = '{"intent":"find_business","slots":{"category":"restaurant"}}'
    >>> reward(prompts=["p", "p"], completions=[good, worse], query=["thai food"] * 2,
    ...        user_city=[ctx["user_city"]] * 2, timestamp=[ctx["timestamp"]] * 2, gains=[ctx["gains"]] * 2)
    [1.0, 0.63093]
    >>> reward.score("thai food", '{"intent":"find_business","intent":"book","slots":{}}', **ctx)
    -1.0
    >>> reward.score("thai food", "find_business category=restaurant cuisine=thai", **ctx,
    ...              fmt="compact")  # good, compact
    1.0
    """

    __name__ = "retrieval_reward"  # TRL logs a reward function under its name

    def __init__(self, searcher, schema: Schema, k: int = 10, max_chars: int = 400, depth: int | None = None):
        self.searcher, self.schema, self.k, self.max_chars = searcher, schema, k, max_chars
        self.depth = depth or 2 * k
        self.names = name_slots(schema)
        self.written = set(self.names) | {
            s.name for s in schema.slots.values() if s.grounded
        }  # values the query must write
        self.timed = {
            s.name for s in schema.slots.values() if s.filter in ("open", "day")
        }  # slots whose search depends on the time
        catalog = getattr(searcher, "catalog", None)  # a Searcher has one; a stand-in in a doctest may not
        self.known = NameBook(catalog["name"]) if catalog is not None and "name" in catalog else None
        self._searches: dict[tuple, list[str]] = {}
        self.calls = self.search_calls = 0

    def score(
        self,
        query: str,
        completion: str,
        user_city: str,
        timestamp: str | datetime,
        gains: dict[str, float] | str,
        fmt: str = "json",
    ) -> float:
        """Reward of one completion (in format `fmt`) for one logged context of a query: `gains` holds the debiased
        gain of every business the log showed for the query's text in `user_city` (`querytune.train.clicks`)."""
        self.calls += 1
        try:
            parse = strict_parse(self.schema, completion, self.max_chars, fmt)
        except ParseError:
            return INVALID
        if not self.searchable(parse, query):
            return 0.0
        if isinstance(gains, str):
            gains = json.loads(gains)
        if not any(g > 0 for g in gains.values()):
            return 0.0
        return condensed_ndcg(self.ranked(parse, user_city, timestamp), gains, self.k)

    def searchable(self, parse, query: str) -> bool:
        """Whether a valid parse runs a search this reward judges: an intent that takes no slots (out of scope) runs
        none; a name (or grounded value) the query does not write, nor an alias of it, is made up or the clicked
        business's; a name no business has is the query copied into a name slot."""
        if self.schema.intents[parse.intent].slots == ():
            return False
        if any(not self.schema.slots[n].written_in(v, query) for n, v in parse.slots.items() if n in self.written):
            return False
        return self.known is None or all(
            n not in parse.slots or self.known.has(str(parse.slots[n])) for n in self.names
        )

    def ranked(self, parse, user_city: str, timestamp: str | datetime) -> list[str]:
        """The top `depth` businesses of a parse's search in one context (cached for the life of the object)."""
        from querytune.search import Context

        ts = timestamp if isinstance(timestamp, datetime) else datetime.fromisoformat(str(timestamp))
        when = (
            ts.isoformat(timespec="minutes") if self.timed & set(parse.slots) else None
        )  # untimed searches share one result
        key = (parse.to_json(), user_city, when)
        ranked = self._searches.get(key)
        if ranked is None:
            self.search_calls += 1
            ranked = self._searches[key] = self.searcher.search(parse, Context(user_city, ts), k=self.depth)
        return ranked

    def __call__(
        self,
        prompts=None,
        completions=None,
        query=None,
        user_city=None,
        timestamp=None,
        gains=None,
        contexts=None,
        fmt=None,
        **_,
    ) -> list[float]:
        """TRL's reward shape. With a `contexts` column (JSON lists of {user_city, timestamp, gains}), each query is
        scored in all of them (`score_in_contexts`); otherwise in its one user_city/timestamp/gains. With an `fmt`
        column, each completion is read in that format (the one the policy writes); otherwise as JSON."""
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # plain or conversational
        fmts = fmt if fmt is not None else ["json"] * len(texts)
        if contexts is not None:
            return [
                score_in_contexts(partial(self.score, fmt=f), q, c, json.loads(x) if isinstance(x, str) else x)
                for q, c, x, f in zip(query, texts, contexts, fmts, strict=True)
            ]
        return [
            self.score(q, c, u, t, g, f)
            for q, c, u, t, g, f in zip(query, texts, user_city, timestamp, gains, fmts, strict=True)
        ]


def retrieval_reward(init, index) -> tuple[RetrievalReward, Schema]:
    """The reward over an index for a model folder's schema (every stage scores parses in its init's schema),
    and that schema."""
    from querytune.runtime.model import ModelFolder
    from querytune.search import Searcher

    schema = ModelFolder.open(init).schema
    return RetrievalReward(Searcher(index, schema), schema), schema


def score_in_contexts(score, query: str, completion: str, contexts: list[dict[str, Any]]) -> float:
    """`score` (a reward's `score(query, completion, user_city, timestamp, gains)`) of one completion of a query,
    averaged over the query's logged contexts (`querytune.train.clicks.contexts_by_text`: rows spread over the log, each
    with its city's gains). Rows weigh alike, so cities count as often as users typed the text there: a parse
    that drops "atx" from "dentist atx" loses only where users are outside Austin.

    >>> by_city = lambda q, c, user_city, timestamp, gains: 1.0 if user_city == "austin" else 0.0
    >>> score_in_contexts(by_city, "dentist atx", "{}", [
    ...     {"user_city": "austin", "timestamp": "2026-09-01T12:00", "gains": {"b1": 0.5}},
    ...     {"user_city": "austin", "timestamp": "2026-09-02T12:00", "gains": {"b1": 0.5}},
    ...     {"user_city": "boston", "timestamp": "2026-09-01T12:00", "gains": {"b1": 0.4}}])
    0.66667
    """
    scores = [score(query, completion, c["user_city"], c["timestamp"], c["gains"]) for c in contexts]
    return round(sum(scores) / len(scores), 5) if scores else 0.0
