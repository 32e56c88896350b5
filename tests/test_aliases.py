from __future__ import annotations

from querytune.labeled import LabeledRow
from querytune.runtime.model import ModelFolder
from querytune.runtime.prediction import validate_output
from querytune.schema import Parse
from querytune.schema_file import load_schema
from querytune.train.aliases import merge_aliases, mine_aliases
from querytune.train.sft import train_sft
from tests.test_sft import ROWS, TINY

SCHEMA = load_schema()


def rows(*pairs: tuple[str, dict]) -> list[LabeledRow]:
    return [
        LabeledRow(id=str(i), text=text, intent="find_business", slots=slots) for i, (text, slots) in enumerate(pairs)
    ]


SOCO = {"category": "restaurant", "city": "austin", "neighborhood": "south congress"}
NICKNAMES = rows(
    ("tacos soco", SOCO),
    ("soco brunch spots", SOCO),
    ("bars in soco atx", SOCO | {"category": "bar"}),
    ("wburg bagels", {"category": "bakery", "neighborhood": "williamsburg"}),  # seen once: not enough evidence
    ("pizza eastside", {"category": "restaurant", "neighborhood": "east austin"}),  # "eastside" for two places
    ("eastside coffee", {"category": "cafe", "neighborhood": "east austin"}),
    ("eastside barber", {"category": "barber", "neighborhood": "east nashville"}),
    ("cheap thai near me", {"category": "restaurant", "cuisine": "thai", "price": "cheap", "near_me": True}),
)


def test_mining_finds_a_nickname_and_rejects_one_offs_and_ambiguous_words():
    mined = mine_aliases(NICKNAMES, SCHEMA)
    assert mined == {
        "neighborhood": {"soco": {"value": "south congress", "rows": 3, "precision": 1.0}},
        "city": {"soco": {"value": "austin", "rows": 3, "precision": 1.0}},
    }  # the labels put soco in austin too
    once = mine_aliases(NICKNAMES, SCHEMA, min_rows=1)[
        "neighborhood"
    ]  # with one row allowed: the longest n-gram of that row
    assert once["wburg bagels"]["value"] == "williamsburg" and "wburg" not in once and "bagels" not in once
    assert (
        "eastside" not in mine_aliases(NICKNAMES, SCHEMA, min_precision=0.7)["neighborhood"]
    )  # 2 of 3 rows: east austin


def test_an_alias_the_schema_has_is_never_overridden():
    chi = rows(
        ("pizza chi", {"category": "restaurant", "city": "chicago", "neighborhood": "chelsea"}),
        ("bars chi", {"category": "bar", "city": "chicago", "neighborhood": "chelsea"}),
    )
    assert "chi" not in mine_aliases(chi, SCHEMA).get(
        "neighborhood", {}
    )  # "chi" is a written form of a value (chicago)
    merged = merge_aliases(SCHEMA, {"city": {"chi": "boston", "beantown": "boston"}})
    assert merged.slots["city"].aliases["chi"] == "chicago" and merged.slots["city"].aliases["beantown"] == "boston"


def test_a_mined_alias_passes_the_grounding_check():
    parse = Parse("find_business", {"category": "restaurant", "neighborhood": "south congress"})
    assert SCHEMA.ground(parse, "tacos soco")[1] == {"neighborhood": "south congress"}, "dropped without the alias"
    with_alias = merge_aliases(SCHEMA, mine_aliases(NICKNAMES, SCHEMA))
    assert with_alias.ground(parse, "tacos soco") == (parse, {})
    assert with_alias.slots["neighborhood"].canonical("SoCo") == "south congress"
    assert with_alias.ground(parse, "tacos downtown")[1] == {"neighborhood": "south congress"}


def test_sft_writes_the_aliases_its_labels_support_into_the_model_folder(tiny_base, tmp_path):
    train_sft(ROWS + NICKNAMES, SCHEMA, tmp_path / "m", str(tiny_base), TINY, say=lambda _: None)
    folder = ModelFolder.open(tmp_path / "m")
    meta, schema = folder.meta, folder.schema
    assert schema.slots["neighborhood"].aliases["soco"] == "south congress"
    assert meta["mined_aliases"]["neighborhood"]["soco"] == {"value": "south congress", "rows": 3, "precision": 1.0}
    raw = '{"intent":"find_business","slots":{"category":"restaurant","neighborhood":"south congress"}}'
    assert validate_output(schema, "tacos soco", raw, 0.0, True, 64).parse["slots"]["neighborhood"] == "south congress"
    assert validate_output(SCHEMA, "tacos soco", raw, 0.0, True, 64).ungrounded == {"neighborhood": "south congress"}

    wburg = rows(
        ("wburg bagels", {"category": "bakery", "neighborhood": "williamsburg"}),
        ("coffee wburg", {"category": "cafe", "neighborhood": "williamsburg"}),
    )
    train_sft(ROWS + wburg, SCHEMA, tmp_path / "m2", None, TINY, say=lambda _: None, init=tmp_path / "m")
    folder = ModelFolder.open(tmp_path / "m2")
    meta, schema = folder.meta, folder.schema
    assert schema.slots["neighborhood"].aliases == {"soco": "south congress", "wburg": "williamsburg"}
    assert set(meta["mined_aliases"]["neighborhood"]) == {"soco", "wburg"}
