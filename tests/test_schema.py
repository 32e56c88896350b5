"""The label schema: loading, canonicalisation, errors that name the field, version, JSON schema, `schema show`."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

import querytune
from querytune.cli import app
from querytune.schema import DEFAULT_SCHEMA, ParseError, SchemaError, normalize_text
from querytune.schema_file import load_schema, schema_from_dict

SGD_SCHEMA = Path(querytune.__file__).resolve().parent.parent / "data" / "schemas" / "sgd.yaml"


@pytest.fixture(scope="module")
def schema():
    return load_schema()


def test_default_schema_loads(schema):
    assert schema.name == "local"
    assert {"find_business", "find_named_business", "book", "out_of_scope"} == set(schema.intents)
    assert schema.slots["city"].filter == "city"
    assert (
        schema.slots["kid_friendly"].filter == "attribute" and schema.slots["kid_friendly"].attribute == "kid_friendly"
    )
    assert schema.intents["out_of_scope"].slots == ()
    assert len(schema.version) == 12 and int(schema.version, 16) >= 0


def test_normalize_text():
    assert normalize_text("  Cheap\u00a0THAI   food ") == "cheap thai food"
    assert normalize_text("\uff34\uff28\uff21\uff29") == "thai"  # NFKC folds full-width letters


@pytest.mark.parametrize(
    "slots, expected",
    [
        ({"city": "NYC"}, {"city": "new york"}),
        ({"city": "  New   YORK "}, {"city": "new york"}),
        ({"city": "philly"}, {"city": "philadelphia"}),
        ({"cuisine": "Thai"}, {"cuisine": "thai"}),
        ({"near_me": "yes"}, {"near_me": True}),
        ({"near_me": "True"}, {"near_me": True}),
        ({"near_me": "no"}, {"near_me": False}),
        ({"near_me": True}, {"near_me": True}),
        ({"min_rating": "4.5"}, {"min_rating": 4.5}),
        ({"min_rating": "4"}, {"min_rating": 4}),
        ({"party_size": 3.0}, {"party_size": 3}),
        ({"neighborhood": " The  Loop"}, {"neighborhood": "the loop"}),
        ({"price": None}, {}),  # an explicit null means "not said"
    ],
)
def test_parse_canonicalises(schema, slots, expected):
    parse = schema.parse({"intent": "find_business", "slots": slots})
    assert parse.slots == expected
    assert type(parse.slots.get("min_rating", 0)) is type(expected.get("min_rating", 0))


def test_parse_accepts_json_and_serialises_sorted(schema):
    parse = schema.parse('{"intent": "book", "slots": {"party_size": "4", "city": "SF"}}')
    assert parse.to_json() == '{"intent":"book","slots":{"city":"san francisco","party_size":4}}'


@pytest.mark.parametrize(
    "obj, field",
    [
        ({"intent": "find_business", "slots": {"cuisine": "klingon"}}, "slots.cuisine"),
        ({"intent": "find_business", "slots": {"city": "atlantis"}}, "slots.city"),
        ({"intent": "find_business", "slots": {"near_me": "maybe"}}, "slots.near_me"),
        ({"intent": "find_business", "slots": {"min_rating": "lots"}}, "slots.min_rating"),
        ({"intent": "find_business", "slots": {"min_rating": "nan"}}, "slots.min_rating"),
        ({"intent": "find_business", "slots": {"business_name": "  "}}, "slots.business_name"),
        ({"intent": "find_business", "slots": {"colour": "red"}}, "slots.colour"),
        ({"intent": "out_of_scope", "slots": {"city": "nyc"}}, "slots.city"),
        ({"intent": "find_business", "slots": ["city"]}, "slots:"),
        ({"intent": "order_pizza", "slots": {}}, "intent:"),
        ({"slots": {}}, "intent:"),
        ({"intent": "book", "slots": {}, "confidence": 1}, "confidence"),
        ("not json", "not valid JSON"),
    ],
)
def test_parse_errors_name_the_field(schema, obj, field):
    with pytest.raises(ParseError, match=field.replace(".", r"\.")):
        schema.parse(obj)


def test_alias_to_mixed_case_value():
    schema = schema_from_dict(
        {
            "intents": [{"name": "find"}],
            "slots": [{"name": "city", "type": "categorical", "values": ["New York"], "aliases": {"NYC": "New York"}}],
        }
    )
    assert schema.parse({"intent": "find", "slots": {"city": "nyc"}}).slots == {"city": "New York"}
    assert schema.parse({"intent": "find", "slots": {"city": "new york"}}).slots == {"city": "New York"}


@pytest.mark.parametrize(
    "slots, text, kept, dropped",
    [
        (
            {"city": "new york", "neighborhood": "soho"},
            "bars nyc soho",
            {"city": "new york", "neighborhood": "soho"},
            {},
        ),  # alias
        ({"neighborhood": "la jolla"}, "restaurant in la joela", {"neighborhood": "la jolla"}, {}),  # one typo
        (
            {"business_name": "the rustic fork"},
            "the rustci fork hours",
            {"business_name": "the rustic fork"},
            {},
        ),  # swap
        (
            {"city": "boston", "neighborhood": "williamsburg"},
            "wellness vision bos hours",
            {"city": "boston"},
            {"neighborhood": "williamsburg"},
        ),
        (
            {"neighborhood": "chelsea", "category": "yoga_studio"},
            "need a yoga appt today chi",
            {"category": "yoga_studio"},
            {"neighborhood": "chelsea"},
        ),
        ({"business_name": "tony's pizza"}, "pizza near me", {}, {"business_name": "tony's pizza"}),  # made-up name
        ({"business_name": "joe"}, "joes bar", {}, {"business_name": "joe"}),  # short words must match exactly
    ],
)
def test_ground_drops_values_the_query_does_not_write(schema, slots, text, kept, dropped):
    intent = "find_named_business" if "business_name" in slots else "find_business"
    parse, got = schema.ground(schema.parse({"intent": intent, "slots": slots}), text)
    assert (parse.intent, parse.slots, got) == (intent, kept, dropped)


def test_ground_keeps_everything_in_ungrounded_schemas():
    schema = schema_from_dict({"intents": [{"name": "find"}], "slots": [{"name": "b", "type": "text"}]})
    parse = schema.parse({"intent": "find", "slots": {"b": "elsewhere"}})
    assert schema.ground(parse, "a query") == (parse, {})


@pytest.mark.parametrize(
    "text, field",
    [
        ("intents: [{name: find}]\nslots: [{name: b}]\n", r"slots\[0\] \(b\): missing field 'type'"),
        ("intents: [{name: find}]\nslots: [{name: b, type: colour}]\n", r"slots\[0\] \(b\)\.type: 'colour'"),
        (
            "intents: [{name: find}]\nslots: [{name: b, type: categorical}]\n",
            r"slots\[0\] \(b\): missing field 'values'",
        ),
        ("intents: [{name: find}]\nslots: [{name: b, type: categorical, values: []}]\n", r"slots\[0\] \(b\)\.values"),
        (
            "intents: [{name: find}]\nslots: [{name: b, type: text}, {name: b, type: number}]\n",
            r"slots\[1\]\.name: duplicate",
        ),
        (
            "intents: [{name: find}]\nslots: [{name: b, type: categorical, values: [x], aliases: {z: w}}]\n",
            r"slots\[0\] \(b\)\.aliases\.z: 'w'",
        ),
        (
            "intents: [{name: find}]\nslots: [{name: b, type: text, filter: colour}]\n",
            r"slots\[0\] \(b\)\.filter: 'colour'",
        ),
        (
            "intents: [{name: find}]\nslots: [{name: b, type: categorical, values: [X, x]}]\n",
            r"\(b\)\.values: duplicate",
        ),
        ("intents: [{name: find}]\nslots: [{name: 2b, type: text}]\n", r"slots\[0\]\.name"),
        (
            "intents: [{name: find}]\nslots: [{name: b, type: boolean, grounded: true}]\n",
            r"\(b\)\.grounded: only categorical",
        ),
        (
            "intents: [{name: find}]\nslots: [{name: b, type: text, grounded: maybe}]\n",
            r"\(b\)\.grounded: expected true or false",
        ),
        ("intents: [{name: find, slots: [c]}]\nslots: [{name: b, type: text}]\n", r"intents\[0\] \(find\)\.slots: 'c'"),
        ("intents: []\n", r"intents: at least one"),
        ("slots: []\n", r"missing field 'intents'"),
        ("intents: [{name: find}\n", r"not valid YAML"),
    ],
)
def test_bad_schema_names_the_field(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SchemaError, match=field) as info:
        load_schema(path)
    assert str(path) in str(info.value)


def test_missing_schema_file(tmp_path):
    with pytest.raises(SchemaError, match="not found"):
        load_schema(tmp_path / "nope.yaml")


def test_version_tracks_content_not_layout(tmp_path):
    original = DEFAULT_SCHEMA.read_text()
    raw = yaml.safe_load(original)
    reformatted = tmp_path / "reformatted.yaml"
    reformatted.write_text(
        "# the same schema, laid out differently\n" + yaml.safe_dump(raw, default_flow_style=True, width=60)
    )
    assert original != reformatted.read_text()
    assert load_schema(reformatted).version == load_schema(DEFAULT_SCHEMA).version

    cuisine = next(s for s in raw["slots"] if s["name"] == "cuisine")
    cuisine["values"].append("ethiopian")
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    assert load_schema(changed).version != load_schema(DEFAULT_SCHEMA).version


@pytest.mark.parametrize("path", [DEFAULT_SCHEMA, SGD_SCHEMA], ids=["default", "sgd"])
def test_json_schema_is_valid_draft(path):
    jsonschema.Draft202012Validator.check_schema(load_schema(path).json_schema())


def test_json_schema_accepts_parses_and_rejects_bad_ones(schema):
    spec = schema.json_schema()
    good = schema.parse(
        {
            "intent": "find_business",
            "slots": {
                "cuisine": "Thai",
                "city": "NYC",
                "near_me": "yes",
                "min_rating": "4.5",
                "business_name": "Joe's",
            },
        }
    )
    jsonschema.validate(good.to_dict(), spec)
    jsonschema.validate(schema.parse({"intent": "out_of_scope"}).to_dict(), spec)
    for bad in (
        {"intent": "find_business", "slots": {"cuisine": "klingon"}},
        {"intent": "find_business", "slots": {"colour": "red"}},
        {"intent": "find_business", "slots": {"near_me": "yes"}},  # not canonical: a string, not a boolean
        {"intent": "find_business", "slots": {"business_name": ""}},
        {"intent": "order_pizza", "slots": {}},
        {"intent": "find_business"},
        {"intent": "find_business", "slots": {}, "extra": 1},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, spec)


def test_cli_show_prints_schema():
    result = CliRunner().invoke(app, ["schema", "show"])
    assert result.exit_code == 0, result.output
    schema = load_schema()
    assert f"local (version {schema.version})" in result.stdout
    for name in ("find_business", "out_of_scope", "kid_friendly", "attribute:kid_friendly"):
        assert name in result.stdout


def test_cli_show_json_schema_and_other_schema():
    result = CliRunner().invoke(app, ["schema", "show", "--schema", str(SGD_SCHEMA), "--json-schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == load_schema(SGD_SCHEMA).json_schema()


def test_cli_show_bad_schema_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("intents: [{name: find}]\nslots: [{name: b}]\n")
    result = CliRunner().invoke(app, ["schema", "show", "--schema", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}: slots[0] (b): missing field 'type'")
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "content, field",
    [
        (
            b"intents: [{name: find}]\nslots: [{name: b, type: text, 1: x, y: z}]\n",
            r"slots\[0\] \(b\): unknown field\(s\) 1, y",
        ),
        (
            b"intents: [{name: find}]\nslots: [{name: b, type: categorical, values: [" + b"9" * 5000 + b"]}]\n",
            r"more than 4300 digits",
        ),
        (b"name: 2001-13-45\nintents: [{name: find}]\n", r"not valid YAML: month must be in 1\.\.12"),
        (b"intents: " + b"[" * 5000 + b"]" * 5000 + b"\n", r"nested too deeply"),
        (b"name: [a, b]\nintents: [{name: find}]\n", r": name: expected a string, got list"),
        (
            b"intents: [{name: find, description: {a: 1}}]\n",
            r"intents\[0\] \(find\)\.description: expected a string, got dict",
        ),
        (
            b"intents: [{name: find}]\nslots: [{name: b, type: text, description: [1]}]\n",
            r"slots\[0\] \(b\)\.description: expected a string",
        ),
        (b"\xed\xa0\x80intents: []\n", r"not UTF-8 text"),
    ],
)
def test_malformed_schema_files_raise_schema_error(tmp_path, content, field):
    """Wrong types at any level, numbers past Python's int parsing limit, impossible dates, deep nesting: a SchemaError
    naming the file and the field, never a TypeError, ValueError or RecursionError."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(SchemaError, match=field) as info:
        load_schema(path)
    assert str(info.value).startswith(f"{path}")


def test_schema_from_dict_rejects_containers_where_text_belongs():
    """An alias bomb (a few lines of YAML that expand to millions of nodes) can only reach a field that takes a
    container, so text fields take text and nothing is ever str()-ed whole."""
    bomb: list = ["x"]
    for _ in range(16):
        bomb = [bomb, bomb]  # 65,536 leaves from 16 shared lists
    with pytest.raises(SchemaError, match=r"<schema>: description: expected a string, got list"):
        schema_from_dict({"description": bomb, "intents": [{"name": "find"}]})


FIND = [{"name": "find"}]


def one_slot(**fields) -> dict:
    return {"intents": FIND, "slots": [{"name": "b", **fields}]}


@pytest.mark.parametrize(
    "raw, message",
    [
        (["intents", "slots"], "s.yaml: expected a mapping with 'intents' and 'slots'"),
        ({"intents": FIND, "version": 2, 3: 4}, "s.yaml: unknown top-level field(s) 3, version"),
        ({"intents": {"find": {}}}, "s.yaml.intents: expected list, got dict"),
        ({"intents": FIND, "slots": {"b": {}}}, "s.yaml: slots: expected a list"),
        ({"intents": FIND, "slots": ["b"]}, "s.yaml: slots[0]: expected a mapping"),
        ({"intents": FIND, "slots": [{"type": "text"}]}, "s.yaml: slots[0]: missing field 'name'"),
        ({"intents": FIND, "slots": [{"name": 7, "type": "text"}]}, "s.yaml: slots[0].name: expected str, got int"),
        (one_slot(type=1), "s.yaml: slots[0] (b).type: expected str, got int"),
        (one_slot(type="categorical", values={"x": 1}), "s.yaml: slots[0] (b).values: expected list, got dict"),
        (one_slot(type="categorical", values=None), "s.yaml: slots[0] (b).values: expected list, got NoneType"),
        (
            one_slot(type="categorical", values=["x", True]),
            "s.yaml: slots[0] (b).values: a categorical slot needs a non-empty list of strings",
        ),
        (one_slot(type="text", values=None), "s.yaml: slots[0] (b).values: only categorical slots take values"),
        (
            one_slot(type="categorical", values=["x"], aliases=["y"]),
            "s.yaml: slots[0] (b).aliases: expected a mapping alias -> value",
        ),
        (
            one_slot(type="text", aliases={"y": "x"}),
            "s.yaml: slots[0] (b).aliases: only categorical slots take aliases",
        ),
        (
            one_slot(type="categorical", values=["x"], aliases={"y": ["x"]}),
            "s.yaml: slots[0] (b).aliases.y: expected one of the slot's values, got list",
        ),
        (
            one_slot(type="categorical", values=["1"], aliases={"one": 2}),
            "s.yaml: slots[0] (b).aliases.one: 2 is not one of the slot's values",
        ),
        (one_slot(type="text", filter=["city"]), "s.yaml: slots[0] (b).filter: expected a string"),
        (one_slot(type="text", filter="attribute:"), "s.yaml: slots[0] (b).filter: 'attribute:' needs a column name"),
        (one_slot(type="text", grounded=None), "s.yaml: slots[0] (b).grounded: expected true or false, got NoneType"),
        (one_slot(type="text", **{"k\ud800": 1}), "s.yaml: slots[0] (b): unknown field(s) k\ud800"),
        ({"intents": ["find"]}, "s.yaml: intents[0]: expected a mapping"),
        ({"intents": [{"name": 1.5}]}, "s.yaml: intents[0].name: expected str, got float"),
        ({"intents": [{"name": "find", "colour": 1}]}, "s.yaml: intents[0] (find): unknown field(s) colour"),
        (
            {"intents": [{"name": "find", "slots": [1]}]},
            "s.yaml: intents[0] (find).slots: expected a list of slot names",
        ),
        # several errors: the first in the order the file is read; a slot's unknown fields before its type, an intent's
        # duplicate name before its unknown fields, every slot before any intent
        (one_slot(type="colour", colour=1), "s.yaml: slots[0] (b): unknown field(s) colour"),
        (
            {"intents": [{"name": "find"}, {"name": "find", "colour": 1}]},
            "s.yaml: intents[1].name: duplicate intent 'find'",
        ),
        (
            {"intents": [{"name": "find", "slots": ["c"]}, {"name": "find"}]},
            "s.yaml: intents[0] (find).slots: 'c' is not a declared slot",
        ),
        (
            {
                "intents": [{"description": []}],
                "slots": [{"name": "b", "type": "text"}, {"name": "b", "type": "colour"}],
            },
            "s.yaml: slots[1] (b).type: 'colour' is not one of text, categorical, boolean, number",
        ),
    ],
)
def test_schema_errors_keep_their_wording(raw, message):
    """Each rule's message word for word: the item by its index, then by its name once that is valid."""
    with pytest.raises(SchemaError) as info:
        schema_from_dict(raw, "s.yaml")
    assert str(info.value) == message


class Unprintable(list):
    """A container that fails the test if printed: where an alias bomb could stand, no message may print it."""

    def __repr__(self):
        raise AssertionError("a container was printed")

    __str__ = __repr__


@pytest.mark.parametrize(
    "raw",
    [
        {"intents": FIND, "name": Unprintable()},
        {"intents": FIND, "extra": Unprintable()},
        {"intents": [{"name": Unprintable()}]},
        {"intents": [{"name": "find", "description": Unprintable()}]},
        {"intents": [{"name": "find", "slots": [Unprintable()]}]},
        one_slot(type=Unprintable()),
        one_slot(type="categorical", values=[Unprintable()]),
        one_slot(type="categorical", values=["x"], aliases={"y": Unprintable()}),
        one_slot(type="text", filter=Unprintable()),
        one_slot(type="text", grounded=Unprintable()),
        one_slot(type="text", aliases=Unprintable(["x"])),
    ],
)
def test_no_schema_error_prints_a_container(raw):
    with pytest.raises(SchemaError, match=r"^s\.yaml: "):
        schema_from_dict(raw, "s.yaml")


def test_schema_from_dict_reads_numbers_as_text_and_empty_fields_as_absent():
    schema = schema_from_dict(
        {
            "name": None,
            "intents": [{"name": "find", "slots": None}],
            "slots": [
                {
                    "name": "b",
                    "type": "categorical",
                    "values": [1, 2.5],
                    "aliases": None,
                    "filter": "attribute:col",
                    "description": 3,
                },
                {"name": "c", "type": "text", "aliases": {}, "grounded": True},
            ],
        },
        "dir/local.yaml",
    )
    assert (schema.name, schema.intents["find"].slots, schema.slots["b"].values, schema.slots["b"].description) == (
        "local",
        None,
        ("1", "2.5"),
        "3",
    )
    assert (schema.slots["b"].filter, schema.slots["b"].attribute, schema.slots["c"].grounded) == (
        "attribute",
        "col",
        True,
    )
    assert schema_from_dict({"intents": FIND, "slots": None}).slots == {}


def test_lone_surrogate_in_a_schema_names_its_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text('intents: [{name: find}]\nslots: [{name: b, type: categorical, values: [ok, "x\\ud800"]}]\n')
    with pytest.raises(SchemaError, match=r"bad\.yaml: slots\[0\]\.values\[1\]: lone surrogate U\+D800"):
        load_schema(path)


@pytest.mark.parametrize(
    "text, field",
    [
        (
            "intents: [{name: find}]\nslots: [{name: b, type: categorical, values: [a, 0x" + "f" * 5000 + "]}]\n",
            r"slots\[0\]\.values\[1\]",
        ),
        ("intents: [{name: find, description: 0" + "7" * 20000 + "}]\n", r"intents\[0\]\.description"),
        ("? 0x" + "f" * 5000 + "\n: 1\nintents: [{name: find}]\n", r"bad\.yaml: a key"),
    ],
)
def test_hex_and_octal_numbers_past_the_digit_limit_are_schema_errors(tmp_path, text, field):
    """YAML reads 0x... and 0777... (octal) without Python's decimal digit limit,
    so printing them later would raise ValueError."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SchemaError, match=field + r".*a number with more than 4300 digits"):
        load_schema(path)


# (word, typed, edits) as the hand-written optimal-string-alignment distance counted them before rapidfuzz replaced it
TYPO_TABLE = [
    ("thai", "thia", 1),
    ("jolla", "joela", 1),
    ("rustic", "rustci", 1),
    ("williamsburg", "wellness", 8),
    ("chelsea", "chi", 5),
    ("sushi", "suhsi", 1),
    ("plumber", "plumbr", 1),
    ("dentist", "dentsit", 1),
    ("a", "", 1),
    ("", "abc", 3),
    ("ca", "abc", 3),
    ("brooklyn", "brookyln", 1),
    ("barbershop", "barbrshop", 1),
    ("koreatown", "koreatwon", 1),
    ("pharmacy", "phaarmacy", 1),
    ("abcdef", "badcfe", 3),
    ("kitten", "sitting", 3),
    ("restaurant", "resturant", 1),
]


@pytest.mark.parametrize("word, typed, edits", TYPO_TABLE)
def test_grounding_counts_typos_as_before(word, typed, edits):
    from rapidfuzz.distance import OSA

    from querytune.schema import is_grounded

    assert OSA.distance(word, typed) == edits
    limit = 0 if len(word) <= 3 else 1 if len(word) <= 6 else 2
    assert is_grounded(word, f"near {typed}") == (not word or abs(len(word) - len(typed)) <= limit and edits <= limit)
