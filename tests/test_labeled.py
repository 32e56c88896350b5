"""Labeled-data import (JSONL, CSV, Parquet), rejects with their line, and `querytune data validate`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import querytune
from querytune.cli import app
from querytune.labeled import LabeledDataError, load_labeled, write_rejects
from querytune.schema_file import load_schema

REPO = Path(querytune.__file__).resolve().parent.parent
SGD_TRAIN = REPO.parent / "shared" / "datasets" / "sgd-local" / "train.jsonl"

GOOD = [
    {
        "id": "q1",
        "text": "cheap thai food in NYC",
        "intent": "find_business",
        "slots": {"cuisine": "Thai", "price": "cheap", "city": "NYC"},
        "source": "log",
    },
    {"id": "q2", "text": "what's the weather", "intent": "out_of_scope", "slots": {}, "source": "log"},
    {"id": "q3", "text": "book a table for 4", "intent": "book", "slots": {"party_size": "4"}, "source": "manual"},
]
BAD = {"id": "q4", "text": "sushi", "intent": "find_business", "slots": {"cuisine": "klingon"}, "source": "log"}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        for r in records:
            writer.writerow({**r, "slots": json.dumps(r["slots"]) if r["slots"] else ""})
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist([{**r, "slots": json.dumps(r["slots"])} for r in records]), path)
    return path


@pytest.fixture(scope="module")
def schema():
    return load_schema()


@pytest.mark.parametrize(
    "fmt, writer, bad_where",
    [
        ("jsonl", write_jsonl, 3),  # GOOD[0], GOOD[1], BAD: line 3
        ("csv", write_csv, 4),  # header is line 1
        ("parquet", write_parquet, "row 3"),
    ],
)
def test_each_format_loads_and_rejects_the_bad_row(tmp_path, schema, fmt, writer, bad_where):
    path = writer(tmp_path / f"labels.{fmt}", [GOOD[0], GOOD[1], BAD, GOOD[2]])
    rows, rejects = load_labeled(path, schema)
    assert [r.id for r in rows] == ["q1", "q2", "q3"]
    assert rows[0].text == "cheap thai food in NYC"
    assert rows[0].slots == {"city": "new york", "cuisine": "thai", "price": "cheap"}
    assert rows[0].parse.to_dict() == {"intent": "find_business", "slots": rows[0].slots}
    assert rows[1].slots == {}  # an empty CSV cell is {}
    assert rows[2].slots == {"party_size": 4}
    assert rows[2].extra == {"source": "manual"}
    assert len(rejects) == 1
    assert rejects[0].where == str(bad_where)
    assert rejects[0].reason.startswith("slots.cuisine: 'klingon' is not one of the allowed values")


def test_jsonl_line_numbers_count_blank_lines_and_bad_json(tmp_path, schema):
    path = tmp_path / "labels.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(GOOD[0]),
                "",  # line 2: blank, skipped
                '{"text": "pizza", "intent": "find_business", "slots": {"cuisine": "pizza"',  # line 3: truncated
                json.dumps({"text": "dentist", "intent": "find_business", "slots": {"category": "dentist"}}),  # line 4
                json.dumps({"text": "", "intent": "book", "slots": {}}),  # line 5
                json.dumps({"text": "x", "intent": "teleport", "slots": {}}),  # line 6
                json.dumps({"text": "x", "intent": "book", "slots": "party_size=2"}),  # line 7
                json.dumps({"text": "x", "intent": "book", "slots": {"colour": "red"}}),  # line 8
                "[1, 2]",  # line 9
                json.dumps({**GOOD[1], "id": "q1"}),  # line 10: the id of line 1 again
            ]
        )
        + "\n"
    )
    rows, rejects = load_labeled(path, load_schema())
    assert [(r.id, r.line) for r in rows] == [("q1", 1), ("labels:4", 4)]
    assert [(r.line, r.reason.split(":")[0]) for r in rejects] == [
        (3, "not valid JSON"),
        (5, "text"),
        (6, "intent"),
        (7, "slots"),
        (8, "slots.colour"),
        (9, "expected an object, got list"),
        (10, "id"),
    ]
    assert rejects[0].raw.startswith('{"text": "pizza"')
    assert rejects[3].reason == "slots: expected an object, got str"
    assert rejects[6].reason == "id: 'q1' already used at line 1"


def test_csv_line_numbers_follow_multiline_fields(tmp_path, schema):
    path = tmp_path / "labels.csv"
    path.write_text(
        "text,intent,slots,note\n"  # line 1
        '"thai food\nin nyc",find_business,"{""cuisine"": ""thai""}","two\nlines"\n'  # lines 2-4
        "\n"  # line 5: blank
        'pizza,find_business,"{""cuisine"": ""pizza""",\n'  # line 6: broken slots JSON
        "pizza,find_business\n"  # line 7: too few fields
        "barber,find_business,,,extra\n"  # line 8: too many fields
        'barber,find_business,"{""category"": ""barber""}",\n'  # line 9
    )
    rows, rejects = load_labeled(path, schema)
    assert [(r.id, r.line, r.text) for r in rows] == [("labels:2", 2, "thai food\nin nyc"), ("labels:9", 9, "barber")]
    assert rows[0].extra == {"note": "two\nlines"}
    assert [(r.line, r.reason) for r in rejects] == [
        (6, "slots: not valid JSON: Expecting ',' delimiter at char 19"),
        (7, "2 fields, the header has 4"),
        (8, "5 fields, the header has 4"),
    ]


def test_parquet_struct_slots_and_missing_text(tmp_path, schema):
    table = pa.Table.from_pylist(
        [
            {
                "text": "nail salon near me",
                "intent": "find_business",
                "slots": {"category": "nail_salon", "near_me": True},
            },
            {"text": None, "intent": "find_business", "slots": {"category": "barber", "near_me": None}},
        ]
    )
    pq.write_table(table, tmp_path / "labels.parquet")
    rows, rejects = load_labeled(tmp_path / "labels.parquet", schema)
    assert [(r.id, r.slots) for r in rows] == [("labels:1", {"category": "nail_salon", "near_me": True})]
    assert [(r.where, r.reason) for r in rejects] == [("row 2", "text: missing or empty")]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", "", "no rows"),
        ("blank.jsonl", "\n\n  \n", "no rows"),
        ("empty.csv", "", "no rows"),
        ("header.csv", "text,intent,slots\n", "no rows"),
        ("noslots.csv", "text,intent\nhi,book\n", "missing required column(s) slots"),
        ("nointent.jsonl", '{"text": "hi", "slots": {}}\n', "missing required column(s) intent"),
        ("labels.txt", "hi\n", "unknown format '.txt'"),
        ("latin1.csv", b"text,intent,slots\ncaf\xe9,book,\n", "not UTF-8"),
        ("broken.parquet", "not parquet", "not a readable Parquet file"),
    ],
)
def test_unusable_files_raise_naming_the_file(tmp_path, schema, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LabeledDataError) as info:
        load_labeled(path, schema)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_missing_file(tmp_path, schema):
    with pytest.raises(LabeledDataError, match="labels.jsonl: file not found"):
        load_labeled(tmp_path / "labels.jsonl", schema)


def test_write_rejects(tmp_path, schema):
    path = write_jsonl(tmp_path / "labels.jsonl", [GOOD[0], "{oops", BAD])
    _, rejects = load_labeled(path, schema)
    write_rejects(rejects, tmp_path / "out" / "rejects.jsonl")
    written = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(w["line"], w["raw"]) for w in written] == [(2, "{oops"), (3, BAD)]
    assert written[1]["reason"].startswith("slots.cuisine:")


def test_cli_validate_fails_listing_rejects(tmp_path):
    path = write_jsonl(tmp_path / "labels.jsonl", [GOOD[0], BAD, "{oops", GOOD[1]])
    result = CliRunner().invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 1
    assert "2 rows ok, 2 rejected (schema local" in result.stdout
    assert "find_business" in result.stdout and "out_of_scope" in result.stdout
    assert result.stderr.splitlines() == [
        f"{path}:2: slots.cuisine: 'klingon' is not one of the allowed values "
        "(thai, mexican, italian, chinese, japanese, sushi, indian, vietnamese, korean, bbq, pizza, burgers, ...)",
        f"{path}:3: not valid JSON: Expecting property name enclosed in double quotes at char 1",
    ]
    capped = CliRunner().invoke(app, ["data", "validate", str(path), "--max-errors", "1"])
    assert capped.exit_code == 1
    assert capped.stderr.splitlines()[1:] == ["... and 1 more (--rejects FILE writes them all)"]


def test_cli_validate_writes_rejects_and_passes(tmp_path):
    path = write_parquet(tmp_path / "labels.parquet", [GOOD[0], BAD, GOOD[1]])
    rejects = tmp_path / "rejects.jsonl"
    result = CliRunner().invoke(app, ["data", "validate", str(path), "--rejects", str(rejects)])
    assert result.exit_code == 0, result.output
    assert f"wrote 1 rejects to {rejects}" in result.stdout
    assert [json.loads(line)["line"] for line in rejects.read_text().splitlines()] == [2]

    only_bad = write_jsonl(tmp_path / "bad.jsonl", [BAD])
    result = CliRunner().invoke(app, ["data", "validate", str(only_bad), "--rejects", str(rejects)])
    assert result.exit_code == 1  # nothing usable is still a failure


def test_cli_validate_parquet_rejects_say_row(tmp_path):
    path = write_parquet(tmp_path / "labels.parquet", [GOOD[0], BAD])
    result = CliRunner().invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{path}:row 2: slots.cuisine:")


def test_cli_validate_clean_file_and_other_schema(tmp_path):
    schema = tmp_path / "tiny.yaml"
    schema.write_text("name: tiny\nintents: [{name: greet}]\nslots: [{name: who, type: text}]\n")
    path = write_csv(tmp_path / "labels.csv", [{"text": "hi bob", "intent": "greet", "slots": {"who": "Bob"}}])
    result = CliRunner().invoke(app, ["data", "validate", str(path), "--schema", str(schema)])
    assert result.exit_code == 0, result.output
    assert f"1 rows ok, 0 rejected (schema tiny {load_schema(schema).version})" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["validate", "{tmp}/nope.jsonl"], "error: {tmp}/nope.jsonl: file not found"),
        (
            ["validate", "{tmp}/labels.jsonl", "--schema", "{tmp}/nope.yaml"],
            "error: {tmp}/nope.yaml: schema file not found",
        ),
    ],
)
def test_cli_validate_user_errors_exit_2(tmp_path, args, message):
    write_jsonl(tmp_path / "labels.jsonl", GOOD)
    result = CliRunner().invoke(app, ["data", *(a.format(tmp=tmp_path) for a in args)])
    assert result.exit_code == 2
    assert result.stderr.strip() == message.format(tmp=tmp_path)
    assert "Traceback" not in result.output


@pytest.mark.skipif(not SGD_TRAIN.is_file(), reason=f"sgd-local data not found at {SGD_TRAIN}")
def test_sgd_local_loads_without_rejects():
    schema = load_schema(REPO / "data" / "schemas" / "sgd.yaml")
    rows, rejects = load_labeled(SGD_TRAIN, schema)
    assert rejects == []
    assert len(rows) == 5267
    assert len({r.id for r in rows}) == 5267
    assert rows[0].slots == {"city": "san francisco", "event_type": "Music"}
    assert rows[0].extra == {"service": "Events_1", "vertical": "event"}
    assert {r.intent for r in rows} <= set(schema.intents)


def test_split_is_fixed_by_id(tmp_path):
    rows = [
        {"id": f"r{i}", "text": f"pizza {i}", "intent": "find_business", "slots": {"cuisine": "pizza"}}
        for i in range(400)
    ]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows[::-1])
    for name, src in (("a", path), ("b", shuffled)):
        result = CliRunner().invoke(app, ["data", "split", str(src), "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    ids = lambda p: sorted(json.loads(line)["id"] for line in p.read_text().splitlines())  # noqa: E731
    assert ids(tmp_path / "a" / "train.jsonl") == ids(tmp_path / "b" / "train.jsonl")
    n_train = len(ids(tmp_path / "a" / "train.jsonl"))
    assert 280 < n_train < 360 and n_train + len(ids(tmp_path / "a" / "heldout.jsonl")) == 400
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:3] + [{"id": "x", "text": "t", "intent": "nope", "slots": {}}])
    result = CliRunner().invoke(app, ["data", "split", str(bad), "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "nope" in result.output


def test_huge_numbers_and_lone_surrogates_are_rejects_not_crashes(tmp_path, schema):
    path = tmp_path / "labels.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(GOOD[0]),
                '{"text": "\\udc80 pizza", "intent": "find_business", "slots": {}}',  # line 2: a lone surrogate
                '{"text": "x", "intent": "book", "slots": {"party_size": '
                + "9" * 5000
                + "}}",  # line 3: a 5,000-digit number
                "[" * 100_000,  # line 4: nested past the parser's depth
            ]
        )
        + "\n"
    )
    rows, rejects = load_labeled(path, schema)
    assert [r.id for r in rows] == ["q1"]
    assert [r.line for r in rejects] == [2, 3, 4]
    assert "lone surrogate U+DC80" in rejects[0].reason
    assert "more than 4300 digits" in rejects[1].reason and "nested too deeply" in rejects[2].reason
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text('text,intent,slots\nx,book,"{""party_size"": ' + "9" * 5000 + '}"\n')
    _, rejects = load_labeled(csv_path, schema)
    assert [(r.line, "more than 4300 digits" in r.reason) for r in rejects] == [(2, True)]
