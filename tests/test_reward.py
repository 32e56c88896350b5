"""The retrieval reward on hand-made cases, including attempts to game it, over a real FAISS index of the
small world (hashing embedder), and end to end from a synthetic click log through `click_targets`."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from querytune.runtime.formats import completion
from querytune.schema import ParseError
from querytune.schema_file import load_schema
from querytune.search import Context, Searcher, build_index
from querytune.train.reward import INVALID, RetrievalReward, condensed_ndcg, score_in_contexts, strict_parse
from querytune.train.targets import click_targets, target_score

SCHEMA = load_schema()


@pytest.fixture()
def reward(small_world, hash_embedder, tmp_path):
    build_index(pd.read_parquet(small_world / "catalog.parquet"), tmp_path / "index", hash_embedder)
    return RetrievalReward(Searcher(tmp_path / "index", SCHEMA, embedder=hash_embedder), SCHEMA)


def case(reward, parse: dict, city="austin"):
    """Over the log every business of the city was shown (all judged) and users clicked what `parse` itself
    retrieves first (its top 3): `parse` is the perfect answer."""
    from querytune.schema import Parse

    p = SCHEMA.parse(parse)
    ranked = reward.searcher.search(
        Parse(p.intent, p.slots), Context(city, pd.Timestamp("2026-09-02T19:00").to_pydatetime())
    )
    catalog = reward.searcher.catalog
    shown = dict.fromkeys(catalog.loc[catalog["city"] == city, "business_id"], 0.0)
    return {"user_city": city, "timestamp": "2026-09-02T19:00:00", "gains": shown | dict.fromkeys(ranked[:3], 0.9)}


GOOD = {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "thai", "price": "cheap"}}


def test_the_parse_that_finds_the_clicks_scores_best(reward):
    ctx = case(reward, GOOD)
    best = reward.score("cheap thai", json.dumps(GOOD), **ctx)
    vaguer = reward.score(
        "cheap thai", json.dumps({"intent": "find_business", "slots": {"category": "plumber"}}), **ctx
    )
    empty = reward.score("cheap thai", '{"intent":"find_business","slots":{}}', **ctx)
    assert best == 1.0
    assert 0.0 <= vaguer < best and 0.0 <= empty < best


@pytest.mark.parametrize(
    "completion",
    [
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
    ],
)
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
    assert reward.score("cheap thai", json.dumps(GOOD), **(ctx | {"gains": {}})) == 0.0
    assert reward.score("cheap thai", json.dumps(GOOD), **(ctx | {"gains": dict.fromkeys(ctx["gains"], 0.0)})) == 0.0


def test_trl_shape_and_cache(reward):
    ctx = case(reward, GOOD)
    n = 4
    out = reward(
        prompts=["p"] * n,
        completions=[json.dumps(GOOD)] * 2 + [[{"role": "assistant", "content": json.dumps(GOOD)}], "x"],
        query=["cheap thai"] * n,
        user_city=[ctx["user_city"]] * n,
        timestamp=[ctx["timestamp"]] * n,
        gains=[json.dumps(ctx["gains"])] * n,
    )
    assert out == [1.0, 1.0, 1.0, INVALID]
    assert reward.search_calls == 1  # three valid scores of one parse in one context share one search


def test_a_compact_completion_scores_as_its_json_twin(reward):
    """GRPO's policy writes its folder's format, while candidates and pairs are held as JSON: read in its format, a
    compact completion earns what its JSON twin earns, and each reader stays strict (TRL's shape: the `fmt` column)."""
    ctx, query = case(reward, GOOD), "cheap thai in east austin 4.5 stars"
    quoted = {
        "intent": "find_business",
        "slots": {"cuisine": "thai", "neighborhood": "east austin", "min_rating": 4.5, "outdoor_seating": False},
    }
    for parse in (
        GOOD,
        quoted,
        {"intent": "find_business", "slots": {"category": "plumber", "near_me": True}},
        {"intent": "out_of_scope", "slots": {}},
    ):
        twin = completion("json", parse)
        assert reward.score(query, completion("compact", parse), **ctx, fmt="compact") == reward.score(
            query, twin, **ctx
        )
    assert reward.score(query, completion("compact", GOOD), **ctx, fmt="compact") == 1.0
    for text, fmt in (
        ("find_business cuisine=thai cuisine=thai", "compact"),
        ("cheap thai", "compact"),
        (json.dumps(GOOD), "compact"),
        (completion("compact", GOOD), "json"),
    ):  # a slot twice, the query copied back, the other format
        assert reward.score(query, text, **ctx, fmt=fmt) == INVALID, text
    out = reward(
        prompts=[query + "\n"] * 2,
        completions=[completion("compact", GOOD), json.dumps(GOOD)],
        query=[query] * 2,
        user_city=[ctx["user_city"]] * 2,
        timestamp=[ctx["timestamp"]] * 2,
        gains=[ctx["gains"]] * 2,
        fmt=["compact"] * 2,
    )
    assert out == [1.0, INVALID]


def test_strict_parse_refuses_repeats():
    with pytest.raises(ParseError, match="repeated"):
        strict_parse(SCHEMA, '{"intent":"book","slots":{"day":"monday","day":"friday"}}')


def test_the_condensed_list_ignores_businesses_the_log_never_showed():
    gains = {"b1": 0.9, "b2": 0.4, "b3": 0.0}
    assert (
        condensed_ndcg(["new1", "b1", "new2", "new3", "b2", "b3"], gains)
        == condensed_ndcg(["b1", "b2", "b3"], gains)
        == 1.0
    )
    assert condensed_ndcg(["b2", "b1"], gains) < 1.0  # among shown businesses the order still counts
    assert condensed_ndcg(["new1", "new2"], gains) == 0.0  # none of what users were shown: nothing to credit


class Shelf:
    """A stand-in index: a fixed ranking per cuisine, the depth it was asked for recorded."""

    def __init__(self, lists):
        self.lists, self.asked = lists, []

    def search(self, parse, ctx, k=10, fallback_text=None):
        self.asked.append((ctx.user_city, ctx.timestamp.isoformat(timespec="minutes"), k))
        return self.lists.get(parse.slots.get("cuisine"), [])[:k]


def test_a_parse_is_not_punished_for_good_businesses_the_log_never_showed():
    """Thai A finds the clicked business second, behind a business the log never showed; Thai B finds it first
    but shows a business users saw and skipped: A scores as if the unshown one were not there."""
    shelf = Shelf({"thai": ["unshown", "b1", "b2"], "vietnamese": ["b2", "b1"]})
    reward = RetrievalReward(shelf, SCHEMA)
    ctx = {"user_city": "austin", "timestamp": "2026-09-02T19:00:00", "gains": {"b1": 0.7, "b2": 0.0}}
    thai = '{"intent":"find_business","slots":{"category":"restaurant","cuisine":"thai"}}'
    other = '{"intent":"find_business","slots":{"category":"restaurant","cuisine":"vietnamese"}}'
    assert reward.score("thai", thai, **ctx) == 1.0 > reward.score("thai", other, **ctx)
    assert shelf.asked[0][2] == 20  # the condensed list is taken from the parse's top 2k


def test_each_context_is_searched_at_its_own_time_only_when_the_parse_needs_the_time():
    shelf = Shelf({"thai": ["b1"]})
    reward = RetrievalReward(shelf, SCHEMA)
    contexts = [
        {"user_city": "austin", "timestamp": f"2026-09-0{d}T{h}:00:00", "gains": {"b1": 0.5}}
        for d, h in ((1, 12), (2, 23), (3, 12))
    ]
    plain = '{"intent":"find_business","slots":{"cuisine":"thai"}}'
    timed = '{"intent":"find_business","slots":{"cuisine":"thai","open":"now"}}'
    assert score_in_contexts(reward.score, "thai open now", plain, contexts) == 1.0
    assert reward.search_calls == 1  # no time in the parse: one search serves every context of the city
    assert score_in_contexts(reward.score, "thai open now", timed, contexts) == 1.0
    assert reward.search_calls == 4 and [a[1] for a in shelf.asked[1:]] == [
        "2026-09-01T12:00",
        "2026-09-02T23:00",
        "2026-09-03T12:00",
    ]


def test_a_query_typed_in_several_cities_is_scored_in_each_context(reward):
    """A parse without the city ("dentist atx" read as just "dentist") finds the clicks only where the user is in
    that city: averaged over the logged rows, it earns the share of rows typed there."""
    in_austin = {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "thai", "city": "austin"}}
    no_city = {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "thai"}}
    austin, boston = (
        case(reward, in_austin, city="austin"),
        case(reward, in_austin, city="boston"),
    )  # Austin places shown in both
    contexts = [austin] * 3 + [boston]  # 3 rows typed in Austin, 1 in Boston
    assert score_in_contexts(reward.score, "thai atx", json.dumps(in_austin), contexts) == 1.0
    assert score_in_contexts(reward.score, "thai atx", json.dumps(no_city), contexts) == pytest.approx(3 / 4)
    out = reward(
        prompts=["p"] * 2,
        completions=[json.dumps(in_austin), json.dumps(no_city)],
        query=["thai atx"] * 2,
        user_city=["austin"] * 2,
        timestamp=[austin["timestamp"]] * 2,
        gains=[json.dumps(boston["gains"])] * 2,
        contexts=[json.dumps(contexts)] * 2,
    )  # TRL passes the dataset's columns: contexts wins over the one context
    assert out == [1.0, pytest.approx(3 / 4)]
    assert score_in_contexts(reward.score, "thai atx", "{not json", contexts) == INVALID


@pytest.mark.parametrize("v1", [False, True])
def test_the_reward_prefers_the_parse_that_finds_what_users_clicked_in_a_logged_world(reward, small_world, v1):
    """A synthetic log for "cheap thai" in Austin: the ranker shows the Thai parse's top 10 in randomised order
    (a few slots swapped from deeper ranks, logged with their display probability; v1: no `display_p`), users
    click its first 3 businesses wherever they are shown. Through `click_targets`, the parse that retrieves the
    clicked businesses scores above one that retrieves other businesses, whichever log version."""
    import random

    thai = SCHEMA.parse(GOOD)
    at = pd.Timestamp("2026-09-02T19:00").to_pydatetime()
    ranked = reward.searcher.search(thai, Context("austin", at), k=30)
    liked, rng, rows = set(ranked[:3]), random.Random(0), []
    for r in range(40):
        shown, probs = list(ranked[:10]), [0.95] * 10
        rng.shuffle(shown)
        for i in rng.sample(range(10), 2):
            shown[i], probs[i] = ranked[rng.randrange(10, 30)], 0.0025
        clicked = [b for i, b in enumerate(shown) if b in liked and rng.random() < 1 / (i + 1)]
        rows.append(
            {
                "query_id": f"q{r}",
                "timestamp": at + pd.Timedelta(hours=r),
                "user_city": "austin",
                "query": "cheap thai",
                "shown": shown,
                "display_p": probs,
                "clicked": clicked,
                "period": "early",
            }
        )
    log = pd.DataFrame(rows)
    (small_world / "log.parquet").unlink()
    (log.drop(columns="display_p") if v1 else log).to_parquet(small_world / "log.parquet")
    (target,) = click_targets(small_world, 5)
    assert len(target["contexts"]) == 16 and {b for b, g in target["gains"].items() if g > 0} == liked
    assert set(target["gains"]) == {b for s in log["shown"] for b in s}
    pizza = {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "italian", "price": "cheap"}}
    assert target_score(reward, target, json.dumps(GOOD)) > 0.9 > target_score(reward, target, json.dumps(pizza))
