from __future__ import annotations

import regex

from querytune.constrain import schema_regex
from querytune.generate import Parser
from querytune.model import completion_text
from querytune.schema import load_schema
from querytune.sft import train_sft
from tests.test_sft import ROWS, TINY

SCHEMA = load_schema()
PATTERN = regex.compile(schema_regex(SCHEMA))


def test_the_language_is_exactly_the_schemas_completions():
    assert PATTERN.fullmatch('{"intent":"find_business","slots":{"category":"restaurant","cuisine":"thai","near_me":true}}')
    assert PATTERN.fullmatch('{"intent":"out_of_scope","slots":{}}')
    assert PATTERN.fullmatch('{"intent":"book","slots":{"min_rating":4.5,"party_size":4}}')
    assert not PATTERN.fullmatch('{"intent":"order_pizza","slots":{}}')
    assert not PATTERN.fullmatch('{"intent":"book","slots":{"cuisine":"martian"}}')
    assert not PATTERN.fullmatch('{"intent":"book","slots":{"near_me":"yes"}}')
    assert PATTERN.fullmatch('{"intent":"find_bu', partial=True)
    assert not PATTERN.fullmatch('{"intent":"fetch', partial=True)


FULL = {"category": "restaurant", "city": "austin", "cuisine": "thai", "delivery": True, "min_rating": 4.5, "near_me": True,
        "price": "cheap", "business_name": "the rustic fork"}


def test_each_slot_at_most_once_in_name_order():
    head = '{"intent":"find_business","slots":{'
    assert not PATTERN.fullmatch(head + '"category":"bar","category":"bar"}}'), "a repeated slot"
    assert not PATTERN.fullmatch(head + '"cuisine":"thai","category":"restaurant"}}'), "out of name order"
    assert not PATTERN.fullmatch(head + ',"cuisine":"thai"}}') and not PATTERN.fullmatch(head + '"cuisine":"thai",}}')
    assert not PATTERN.fullmatch(head + '"cuisine":"thai""near_me":true}}'), "a missing comma"
    assert PATTERN.fullmatch(head + '"category":"bar","cu', partial=True)
    assert not PATTERN.fullmatch(head + '"category":"bar","cat', partial=True), "no slot after category starts with cat"
    names = sorted(FULL)
    for mask in range(1 << len(names)):  # every ordered subset, as completion_text writes it, and each of its prefixes
        text = completion_text({"intent": "find_business", "slots": {n: FULL[n] for i, n in enumerate(names) if mask >> i & 1}})
        assert PATTERN.fullmatch(text), text
        assert all(PATTERN.fullmatch(text[:cut], partial=True) for cut in range(0, len(text), 7)), text


def test_the_grammar_stays_small_for_many_slots():
    from querytune.schema import schema_from_dict

    sizes = [len(schema_regex(schema_from_dict({"intents": [{"name": "a"}], "slots": [{"name": f"s{i:02d}", "type": "boolean"} for i in range(n)]})))
             for n in (10, 20, 40)]
    assert sizes[2] - sizes[1] < 2.2 * (sizes[1] - sizes[0]), sizes  # linear, not exponential, in the number of slots
    many = schema_from_dict({"intents": [{"name": "a"}], "slots": [{"name": f"s{i:02d}", "type": "boolean"} for i in range(40)]})
    assert regex.fullmatch(schema_regex(many), '{"intent":"a","slots":{"s00":true,"s17":false,"s39":true}}')


def test_constrained_generation_never_leaves_the_language(tiny_base, tmp_path):
    train_sft(ROWS, SCHEMA, tmp_path / "m", str(tiny_base), TINY, say=lambda _: None)
    free = Parser(tmp_path / "m", batch_size=4)
    constrained = Parser(tmp_path / "m", batch_size=4, constrained=True, constrain_top_k=10_000)
    texts = ["cheap thai near me", "plumber", "weather", "book a table for 4"]
    assert not any(p.valid for p in free.parse(texts)), "an untrained random model writes no valid JSON"
    for p in constrained.parse(texts):
        assert PATTERN.fullmatch(p.raw, partial=True), p.raw
        assert p.valid or p.error.startswith("output cut")
    # the exploration of preference tuning decodes the same way: samples and rivals (forks of the greedy
    # completion, resumed part-way) stay inside the language too, and free decoding stays one flag away
    for raws in constrained.sample(texts, 2, temperature=1.0) + constrained.branch(texts, positions=2, alternatives=2) + constrained.beams(texts, 3):
        assert raws and all(PATTERN.fullmatch(r, partial=True) for r in raws), raws
    greedy = [g[0] for g in constrained.sample(texts, 1, temperature=0, constrained=False)]
    assert [g for g in greedy if PATTERN.fullmatch(g, partial=True)] == []
