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
import pytest
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


OWN = Path(__file__).resolve().parents[1] / "data" / "examples" / "own-log"


def test_the_own_log_example_is_what_make_py_writes_and_the_docs_say(tmp_path):
    import pandas as pd

    assert len(pd.read_csv(OWN / "catalog.csv")) == 50 and len(pd.read_csv(OWN / "searches.csv")) == 200
    copy = tmp_path / "own-log"
    shutil.copytree(OWN, copy)
    subprocess.run([sys.executable, str(copy / "make.py")], check=True, cwd=tmp_path)
    for name in ("catalog.csv", "searches.csv", "seed.jsonl"):
        assert (copy / name).read_bytes() == (OWN / name).read_bytes(), f"{name}: run data/examples/own-log/make.py"


def test_a_world_of_ones_own_files_names_every_bad_row(tmp_path):
    import pandas as pd

    searches = pd.read_csv(OWN / "searches.csv")
    bad = searches.head(5).copy()
    bad.loc[0, "clicked"] = '["nowhere"]'
    bad.loc[1, "timestamp"] = "yesterday-ish"
    bad.loc[2, "display_p"] = "[0.5]"
    bad.loc[3, "shown"] = '["b99999", "b00287"]'
    bad.loc[3, "display_p"] = "[1.0, 0.95]"
    bad.loc[3, "clicked"] = '["b99999"]'
    log = tmp_path / "searches.csv"
    pd.concat([bad, searches.iloc[5:]]).to_csv(log, index=False)
    catalog = pd.read_csv(OWN / "catalog.csv")
    catalog.loc[0, "category"] = "spaceport"
    catalog.loc[1, "rating"] = 7
    shops = tmp_path / "catalog.csv"
    catalog.to_csv(shops, index=False)
    out = tmp_path / "world"
    result = CliRunner().invoke(
        app, ["data", "world", "--seed", str(OWN / "seed.jsonl"), "--log", str(log), "--catalog", str(shops),
              "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    reasons = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    said = {r["where"]: r["reason"] for r in reasons}
    assert said[f"{shops}:2"] == "category: 'spaceport' is not one of the schema's category values"
    assert said[f"{shops}:3"] == "price_level: 1 to 4 (0: unknown); rating: 0 to 5"
    assert said[f"{log}:2"] == "clicked: 'nowhere' was not shown"
    assert said[f"{log}:3"] == "timestamp: 'yesterday-ish' is not an ISO time"
    assert said[f"{log}:4"] == "display_p: one probability in (0, 1] per shown business"
    assert said[f"{log}: shown b99999"] == "not in catalog.csv: taken off the 1 pages that show it"
    assert said[f"{log}: shown b00282"].startswith("not in catalog.csv: taken off the ")  # a rejected business
    kept = pd.read_parquet(out / "log.parquet").set_index("query_id")
    lines = [r["where"][len(str(log)) + 1 :] for r in reasons if r["where"].startswith(f"{log}:")]
    assert len(kept) + sum(w.isdigit() for w in lines) == 200, "every search kept or rejected"
    row = kept.loc[bad.loc[3, "query_id"]]
    assert (list(row["shown"]), list(row["display_p"]), list(row["clicked"])) == (["b00287"], [0.95], [])
    assert (kept["period"] == "early").all() and set(kept.columns) >= {"query", "shown", "display_p", "clicked"}
    assert len(pd.read_parquet(out / "catalog.parquet")) == 48


@pytest.mark.slow
def test_rft_runs_from_ones_own_log_and_catalogue(tiny_model, tmp_path):
    """The own-log example (200 searches, 50 businesses) as a world: indexed, mined and trained on by RFT."""
    import pandas as pd

    out, index = tmp_path / "world", tmp_path / "index"
    runner = CliRunner()
    made = runner.invoke(
        app, ["data", "world", "--seed", str(OWN / "seed.jsonl"), "--log", str(OWN / "searches.csv"),
              "--catalog", str(OWN / "catalog.csv"), "--out", str(out)],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert runner.invoke(app, ["index", "build", "--world", str(out), "--out", str(index)]).exit_code == 0
    rft = runner.invoke(
        app, ["train", "rft", "--init", str(tiny_model), "--world", str(out), "--index", str(index),
              "--out", str(tmp_path / "rft"), "--texts", "40", "--max-steps", "2", "--click-values"],
    )  # fmt: skip
    assert rft.exit_code == 0, rft.output
    assert (tmp_path / "rft" / "edits.csv").is_file() and (tmp_path / "rft" / "labels.jsonl").is_file()
    evidence = json.loads((tmp_path / "rft" / "evidence.json").read_text())
    assert evidence["texts_with_clicks"] > 0, "the user's clicks reached the miner"
    meta = json.loads((tmp_path / "rft" / "querytune.json").read_text())
    accepted = pd.read_csv(tmp_path / "rft" / "edits.csv").query("kind == 'click' and accepted")
    assert [a["trigger"] for a in meta["click_aliases"]] == list(accepted["trigger"])
