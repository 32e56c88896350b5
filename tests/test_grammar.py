"""The output language: each format's grammar accepts exactly the completions `formats.completion` writes, reading a
completion back is exact, and constrained decoding (greedy, samples, beams, rivals) never leaves the language."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from querytune.runtime.formats import FORMATS, completion, read
from querytune.runtime.generate import Parser
from querytune.runtime.grammar import ebnf
from querytune.schema import ParseError
from querytune.schema_file import load_schema, schema_from_dict
from querytune.train.sft import train_sft
from tests.test_sft import ROWS, TINY

SCHEMA = load_schema()
FULL = {
    "category": "restaurant",
    "city": "austin",
    "cuisine": "thai",
    "delivery": True,
    "min_rating": 4.5,
    "near_me": True,
    "price": "cheap",
    "business_name": "the rustic fork",
}


def accepts(fmt: str, text: str, schema=SCHEMA) -> bool:
    return xgr.testing._is_grammar_accept_string(ebnf(schema, fmt), text)


def prefix_ok(fmt: str, text: str, schema=SCHEMA) -> bool:
    """Whether `text` can still be completed inside the language."""
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(xgr.TokenizerInfo([])).compile_grammar(ebnf(schema, fmt)))
    return matcher.accept_string(text)


def test_the_json_language_is_exactly_the_schemas_completions():
    assert accepts(
        "json", '{"intent":"find_business","slots":{"category":"restaurant","cuisine":"thai","near_me":true}}'
    )
    assert accepts("json", '{"intent":"out_of_scope","slots":{}}')
    assert accepts("json", '{"intent":"book","slots":{"min_rating":4.5,"party_size":4}}')
    assert not accepts("json", '{"intent":"order_pizza","slots":{}}')
    assert not accepts("json", '{"intent":"book","slots":{"cuisine":"martian"}}')
    assert not accepts("json", '{"intent":"book","slots":{"near_me":"yes"}}')
    assert not accepts("json", '{"intent":"out_of_scope","slots":{"near_me":true}}'), "out_of_scope takes no slot"
    assert prefix_ok("json", '{"intent":"find_bu') and not prefix_ok("json", '{"intent":"fetch')
    head = '{"intent":"find_business","slots":{'
    assert not accepts("json", head + '"category":"bar","category":"bar"}}'), "a repeated slot"
    assert not accepts("json", head + '"cuisine":"thai","category":"restaurant"}}'), "out of name order"
    assert not accepts("json", head + ',"cuisine":"thai"}}') and not accepts("json", head + '"cuisine":"thai",}}')
    assert not prefix_ok("json", head + '"category":"bar","cat'), "no slot after category starts with cat"


def test_the_compact_language_is_exactly_the_schemas_completions():
    assert accepts("compact", "find_business category=restaurant cuisine=thai near_me")
    assert accepts("compact", 'find_business business_name="the rustic fork" city=austin')
    assert accepts("compact", "find_business business_name=rustic delivery=false")
    assert accepts("compact", "out_of_scope")
    assert not accepts("compact", "out_of_scope near_me"), "out_of_scope takes no slot"
    assert not accepts("compact", "order_pizza")
    assert not accepts("compact", "book cuisine=martian")
    assert not accepts("compact", "find_business near_me=true"), "a true boolean is its bare name"
    assert not accepts("compact", "find_business cuisine=thai category=restaurant"), "out of name order"
    assert not accepts("compact", "find_business category=bar category=bar"), "a repeated slot"
    assert not accepts("compact", "find_business  category=bar") and not accepts(
        "compact", "find_business category=bar "
    )
    assert not accepts("compact", "find_business business_name=the rustic"), "a value with a space is quoted"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_ordered_subset_is_written_accepted_and_read_back(fmt):
    names = sorted(FULL)
    for mask in range(1 << len(names)):
        parse = SCHEMA.parse(
            {"intent": "find_business", "slots": {n: FULL[n] for i, n in enumerate(names) if mask >> i & 1}}
        )
        text = completion(fmt, parse)
        assert accepts(fmt, text), text
        assert read(fmt, SCHEMA, text) == parse, text


def test_compact_is_lossless_on_the_worlds_labels(small_world_master):
    rows = [json.loads(line) for line in (small_world_master / "seed.jsonl").read_text().splitlines()]
    for r in rows:
        parse = SCHEMA.parse({"intent": r["intent"], "slots": r["slots"]})
        assert read("compact", SCHEMA, completion("compact", parse)) == parse
        assert accepts("compact", completion("compact", parse)), completion("compact", parse)


def test_compact_quotes_what_would_be_ambiguous():
    schema = schema_from_dict(
        {"intents": [{"name": "a"}], "slots": [{"name": "t", "type": "text"}, {"name": "n", "type": "number"}]}
    )
    for value in ("x=y", 'say "hi"', "back\\slash", "two words", "true", "4"):
        parse = schema.parse({"intent": "a", "slots": {"t": value, "n": -2.5}})
        assert read("compact", schema, completion("compact", parse)) == parse, value
    for bad in ("a t=", "a n=x", "a t=1 t=2", "a zz=1", 'a t="open', "a n=1,t=2"):
        with pytest.raises(ParseError):
            read("compact", schema, bad)


def test_every_character_the_grammar_lets_a_value_hold_reads_back():
    # a random model writes whatever the grammar admits: a control character in a quoted value, or a space Python's
    # \s matches in a bare one, was admitted and then failed to read (`predict` on a freshly trained tiny model)
    schema = schema_from_dict({"intents": [{"name": "a"}], "slots": [{"name": "t", "type": "text"}]})
    admitted = 0
    for fmt, forms in (("compact", ("a t=x%sy", 'a t="x%sy"')), ("json", ('{"intent":"a","slots":{"t":"x%sy"}}',))):
        compiled = xgr.GrammarCompiler(xgr.TokenizerInfo([])).compile_grammar(ebnf(schema, fmt))
        for c in map(chr, range(0x3100)):
            for text in (form % c for form in forms if not "\ud800" <= c <= "\udfff"):
                if xgr.GrammarMatcher(compiled).accept_string(text):
                    admitted += 1
                    assert read(fmt, schema, text).slots["t"], (fmt, c)
    assert admitted > 30_000  # the check saw the alphabet, not a grammar that admits nothing


def test_the_grammar_stays_small_for_many_slots():
    sizes = {
        fmt: [
            len(
                ebnf(
                    schema_from_dict(
                        {
                            "intents": [{"name": "a"}],
                            "slots": [{"name": f"s{i:02d}", "type": "boolean"} for i in range(n)],
                        }
                    ),
                    fmt,
                )
            )
            for n in (10, 20, 40)
        ]
        for fmt in FORMATS
    }
    assert sizes["compact"][2] - sizes["compact"][1] < 2.2 * (sizes["compact"][1] - sizes["compact"][0]), (
        sizes
    )  # linear
    assert sizes["json"][2] < 8 * sizes["json"][1], sizes  # quadratic at worst
    many = schema_from_dict(
        {"intents": [{"name": "a"}], "slots": [{"name": f"s{i:02d}", "type": "boolean"} for i in range(40)]}
    )
    assert accepts("json", '{"intent":"a","slots":{"s00":true,"s17":false,"s39":true}}', many)


@pytest.mark.parametrize("fmt", FORMATS)
def test_constrained_generation_never_leaves_the_language(tiny_base, tmp_path, fmt):
    train_sft(ROWS, SCHEMA, tmp_path / "m", str(tiny_base), TINY, say=lambda _: None, fmt=fmt)
    free = Parser(tmp_path / "m", batch_size=4)
    constrained = Parser(tmp_path / "m", batch_size=4, constrained=True)
    texts = ["cheap thai near me", "plumber", "weather", "book a table for 4"]
    assert not any(p.valid for p in free.parse(texts)), "an untrained random model writes no valid parse"
    for p in constrained.parse(texts):
        assert prefix_ok(fmt, p.raw), p.raw
        assert p.valid or p.error.startswith("output cut"), p.error
    # the exploration of preference tuning decodes the same way: samples and rivals (forks of the greedy
    # completion, resumed part-way) stay inside the language too, and free decoding stays one flag away
    for raws in (
        constrained.sample(texts, 2, temperature=1.0)
        + constrained.branch(texts, positions=2, alternatives=2)
        + constrained.beams(texts, 3)
    ):
        assert raws and all(prefix_ok(fmt, r) for r in raws), raws
    greedy = [g[0] for g in constrained.sample(texts, 1, temperature=0, constrained=False)]
    assert [g for g in greedy if prefix_ok(fmt, g)] == []


def test_the_greedy_loop_gives_generates_parses(tiny_model):
    """`Parser.greedy` (finished rows leave the batch) writes what transformers' `generate` writes, batch by batch."""
    import torch

    parser = Parser(tiny_model, batch_size=8, constrained=True)
    texts = [
        "cheap thai near me",
        "plumber",
        "weather in paris",
        "book a table for 4 tonight",
        "dentist",
        "24h locksmith brooklyn",
    ]
    ids = [parser.tokenizer(p, add_special_tokens=False).input_ids for p in parser.prompts(texts)]
    ours = parser.greedy(ids)
    width = max(map(len, ids))
    pad = parser.tokenizer.pad_token_id
    enc = {
        "input_ids": torch.tensor([[pad] * (width - len(i)) + i for i in ids]),
        "attention_mask": torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids]),
    }
    with torch.inference_mode():
        out = parser.model.generate(
            **enc,
            max_new_tokens=parser.max_new_tokens,
            do_sample=False,
            eos_token_id=parser.tokenizer.eos_token_id,
            pad_token_id=pad,
            **parser._constraint(width),
        )
    for (tokens, _, _), row in zip(ours, out[:, width:].tolist()):
        assert tokens == row[: len(tokens)] and all(t == pad for t in row[len(tokens) :]), (tokens, row)
