"""Bring your own data (docs/data.md): the example the docs walk through, a schema of its own and 20 labeled rows in
data/examples/cinema, validates, trains and predicts through the CLI; the mistakes of a first own dataset (a missing
intent, a forgotten --schema, `filter: none`) each get a line that says what to do."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import xgrammar as xgr
from typer.testing import CliRunner

from querytune.cli import app
from querytune.labeled import load_labeled
from querytune.runtime.formats import WRITES, folder_format
from querytune.runtime.grammar import ebnf
from querytune.runtime.model import ModelFolder
from querytune.schema_file import load_schema, schema_from_dict

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "examples" / "cinema"
DATA, SCHEMA = EXAMPLE / "train.jsonl", EXAMPLE / "schema.yaml"


def test_the_example_is_what_the_docs_say():
    schema = load_schema(SCHEMA)
    rows, rejects = load_labeled(DATA, schema)
    assert (len(schema.intents), len(schema.slots), len(rows), rejects) == (2, 3, 20, [])
    assert {r.intent for r in rows} == set(schema.intents) and {s for r in rows for s in r.slots} == set(schema.slots)
    docs = (EXAMPLE.parents[2] / "docs" / "data.md").read_text()
    assert f"--data {DATA.relative_to(EXAMPLE.parents[2])} --schema {SCHEMA.relative_to(EXAMPLE.parents[2])}" in docs


def test_the_example_trains_and_predicts_with_its_own_schema(tiny_base, tmp_path):
    model = tmp_path / "cinema"
    args = ["--base", str(tiny_base), "--max-steps", "2", "--batch-size", "4", "--no-bf16", "--lora-r", "4"]
    result = CliRunner().invoke(
        app, ["train", "sft", "--data", str(DATA), "--schema", str(SCHEMA), "--out", str(model), *args]
    )
    assert result.exit_code == 0, result.output
    assert "SFT on 20 rows" in result.output and "do not fit" not in result.output
    folder = ModelFolder.open(model)
    assert folder.schema.name == "cinema" and list(folder.schema.intents) == ["find_showtimes", "buy_tickets"]

    queries = ["2 tickets for dune tonight", "when is alien on", "paddington times sat"]
    result = CliRunner().invoke(app, ["predict", "--model", str(model), *queries])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["text"] for line in lines] == queries
    assert {line["model_version"] for line in lines} == {folder.version}
    # two steps of a random tiny model mean nothing: what must hold is that every output stays in the schema's
    # language, a complete one a parse the JSON schema accepts, a cut one (the token cap) a prefix of the language
    grammar = xgr.GrammarCompiler(xgr.TokenizerInfo([])).compile_grammar(
        ebnf(folder.schema, WRITES[folder_format(folder.meta)])
    )
    for line in lines:
        if line["valid"]:
            jsonschema.validate(line["parse"], folder.schema.json_schema())
        else:
            assert line["error"].startswith("output cut at"), line
            assert xgr.GrammarMatcher(grammar).accept_string(line["raw"]), line


def test_training_and_predicting_print_querytunes_own_lines_with_an_eta(tiny_base, tmp_path):
    """Through the console script, as a user runs it: no library's FutureWarning block or tqdm bar beside the
    progress lines, and each step's line says how long the run has left."""
    qt, model = str(Path(sys.executable).parent / "querytune"), str(tmp_path / "m")
    env = {**os.environ, "COLUMNS": "200"}
    train = ["train", "sft", "--data", str(DATA), "--schema", str(SCHEMA), "--out", model, "--base", str(tiny_base)]
    train += ["--max-steps", "3", "--batch-size", "4", "--no-bf16", "--lora-r", "4"]
    for args in (train, ["predict", "--model", model, "2 tickets for dune tonight"]):
        done = subprocess.run([qt, *args], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
        assert "Warning" not in done.stderr and "it/s]" not in done.stdout + done.stderr, done.stderr
        if args is train:
            assert re.search(r"^step 1/3 .*  eta \d+s$", done.stdout, re.M) and "step 3/3" in done.stdout, done.stdout


def test_filter_none_is_no_filter_as_the_docs_say():
    def schema(**slot):
        return schema_from_dict({"intents": [{"name": "a"}], "slots": [{"name": "s", "type": "text", **slot}]})

    assert schema(filter="none").slots["s"].filter is None
    assert schema(filter="none").version == schema().version == schema(filter=None).version


def test_a_missing_intent_names_file_line_field_and_the_intents(tmp_path):
    data = tmp_path / "data.jsonl"
    lines = DATA.read_text().splitlines()
    row = json.loads(lines[2])
    del row["intent"]
    data.write_text("\n".join(lines[:2] + [json.dumps(row)]) + "\n")
    result = CliRunner().invoke(app, ["data", "validate", str(data), "--schema", str(SCHEMA)])
    assert result.exit_code == 1
    assert f"{data}:3: intent: missing (one of: find_showtimes, buy_tickets)" in result.stderr
    assert "--schema" not in result.stderr, "a --schema was given: no hint"


def test_a_forgotten_schema_gets_a_hint(tmp_path):
    shutil.copy(DATA, tmp_path / "train.jsonl")
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path / "train.jsonl")])
    assert result.exit_code == 1 and "give yours with --schema FILE" in result.stderr
    result = CliRunner().invoke(
        app, ["train", "sft", "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 2 and "no usable labeled rows; hint:" in result.output
    assert "give yours with --schema FILE" in result.output and "Traceback" not in result.output
