"""The retrieval reward on hand-made cases, including attempts to game it, over a real FAISS index of the
small world (hashing embedder)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from querytune.reward import INVALID, RetrievalReward, click_grades, score_in_contexts, strict_parse
from querytune.schema import ParseError, load_schema
from querytune.search import Context, Searcher, build_index

SCHEMA = load_schema()


@pytest.fixture()
def reward(small_world, hash_embedder, tmp_path):
    build_index(pd.read_parquet(small_world / "catalog.parquet"), tmp_path / "index", hash_embedder)
    return RetrievalReward(Searcher(tmp_path / "index", SCHEMA, embedder=hash_embedder), SCHEMA)


def case(reward, parse: dict, city="austin"):
    """Clicks = what `parse` itself retrieves (its top 3), so `parse` is the perfect answer."""
    from querytune.schema import Parse

    p = SCHEMA.parse(parse)
    ranked = reward.searcher.search(Parse(p.intent, p.slots), Context(city, pd.Timestamp("2026-09-02T19:00").to_pydatetime()))
    return {"user_city": city, "timestamp": "2026-09-02T19:00:00", "clicks": {b: 3 for b in ranked[:3]}}


GOOD = {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "thai", "price": "cheap"}}


def test_the_parse_that_finds_the_clicks_scores_best(reward):
    ctx = case(reward, GOOD)
    best = reward.score("cheap thai", json.dumps(GOOD), **ctx)
    vaguer = reward.score("cheap thai", json.dumps({"intent": "find_business", "slots": {"category": "plumber"}}), **ctx)
    empty = reward.score("cheap thai", '{"intent":"find_business","slots":{}}', **ctx)
    assert best == 1.0
    assert 0.0 <= vaguer < best and 0.0 <= empty < best


@pytest.mark.parametrize("completion", [
    '{"intent":"find_business","intent":"book","slots":{"category":"restaurant"}}',  # several intents
    '{"intent":["find_business","book"],"slots":{}}',  # several intents as a list
    '{"intent":"find_business","slots":{"cuisine":"thai","cuisine":"thai"}}',  # repeated key
    '{"intent":"find_business","slots":{"spiciness":"hot"}}',  # slot outside the schema
    '{"intent":"find_business","slots":{"cuisine":"martian"}}',  # value outside the slot's list
    '{"intent":"order_pizza","slots":{}}',  # intent outside the schema
    '{"intent":"find_business","slots":{"cuisine":"thai"}} and also a plumber',  # text after the object
    '{"intent":"find_business","slots":{"cuisine":"thai"',  # cut off
    '{"intent":"find_business","slots":{"business_name":"' + "x" * 500 + '"}}',  # over-long
    "cheap thai",  # the query copied back
    "",
])
def test_malformed_or_gaming_outputs_score_below_any_valid_parse(reward, completion):
    ctx = case(reward, GOOD)
    assert reward.score("cheap thai", completion, **ctx) == INVALID
    worst_valid = reward.score("cheap thai", '{"intent":"out_of_scope","slots":{}}', **ctx)
    assert INVALID < worst_valid == 0.0


def test_a_name_must_come_from_the_query(reward, small_world):
    catalog = pd.read_parquet(small_world / "catalog.parquet")
    business = catalog.iloc[0]
    name, city = business["name"].lower(), business["city"]
    named = {"intent": "find_named_business", "slots": {"business_name": name}}
    ctx = case(reward, named, city=city)
    # emitting the clicked business's name for a query that never says it earns nothing
    assert reward.score("somewhere good to eat", json.dumps(named), **ctx) == 0.0
    # copying the name from the query is the right answer
    assert reward.score(f"{name} hours", json.dumps(named), **ctx) == 1.0
    # people mistype names; the canonical name of a mistyped query still counts as written
    typo = name[:-2] + name[-1] + name[-2] if len(name.split()[-1]) >= 4 else name
    assert reward.score(f"{typo} hours", json.dumps(named), **ctx) == 1.0
    # the query copied into the name slot names no business: a category search in disguise earns nothing
    copied = {"intent": "find_named_business", "slots": {"business_name": "cheap thai food"}}
    assert reward.score("cheap thai food", json.dumps(copied), **case(reward, copied, city=city)) == 0.0
    # so does every grounded slot: a neighbourhood the query never names earns nothing
    hood = {"intent": "find_named_business", "slots": {"business_name": name, "neighborhood": business["neighborhood"]}}
    assert reward.score(f"{name} hours", json.dumps(hood), **case(reward, hood, city=city)) == 0.0


def test_empty_slots_and_no_clicks(reward):
    ctx = case(reward, GOOD)
    assert reward.score("cheap thai", '{"intent":"find_business","slots":{}}', **ctx) < 1.0
    assert reward.score("cheap thai", json.dumps(GOOD), **(ctx | {"clicks": {}})) == 0.0


def test_trl_shape_and_cache(reward):
    ctx = case(reward, GOOD)
    n = 4
    out = reward(prompts=["p"] * n, completions=[json.dumps(GOOD)] * 2 + [[{"role": "assistant", "content": json.dumps(GOOD)}], "x"],
                 query=["cheap thai"] * n, user_city=[ctx["user_city"]] * n, timestamp=[ctx["timestamp"]] * n,
                 clicks=[json.dumps(ctx["clicks"])] * n)
    assert out == [1.0, 1.0, 1.0, INVALID]
    assert reward.search_calls == 1  # three valid scores of one parse in one context share one search


def test_click_grades_and_strict_parse():
    assert click_grades({"a": 10, "b": 5, "c": 1}) == {"a": 2, "b": 2, "c": 1}
    assert click_grades({}) == {}
    with pytest.raises(ParseError, match="repeated"):
        strict_parse(SCHEMA, '{"intent":"book","slots":{"day":"monday","day":"friday"}}')


def test_a_query_typed_in_several_cities_is_scored_in_each_weighted_by_its_clicks(reward):
    """A parse without the city ("dentist atx" read as just "dentist") finds the clicks only where the user is in
    that city: scored on every city's clicks, it earns the clicked share of the cities that it serves."""
    in_austin = {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "thai", "city": "austin"}}
    no_city = {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "thai"}}
    austin, boston = case(reward, in_austin, city="austin"), case(reward, in_austin, city="boston")  # clicks on Austin places
    boston["clicks"] = {b: 1 for b in boston["clicks"]}  # 3 clicks from Boston users, 9 from Austin users
    contexts = [austin, boston]
    assert score_in_contexts(reward.score, "thai atx", json.dumps(in_austin), contexts) == 1.0
    assert score_in_contexts(reward.score, "thai atx", json.dumps(no_city), contexts) == pytest.approx(9 / 12)
    out = reward(prompts=["p"] * 2, completions=[json.dumps(in_austin), json.dumps(no_city)], query=["thai atx"] * 2,
                 user_city=["austin"] * 2, timestamp=[austin["timestamp"]] * 2, clicks=[json.dumps(austin["clicks"])] * 2,
                 contexts=[json.dumps(contexts)] * 2)  # TRL passes the dataset's columns: contexts wins over the one context
    assert out == [1.0, pytest.approx(9 / 12)]
    assert score_in_contexts(reward.score, "thai atx", "{not json", contexts) == INVALID
