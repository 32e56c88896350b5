"""Offline labeling: every input row ends up labeled or rejected with its line and reason, each distinct query is
labeled once, and a run killed at any point resumes to the same output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from querytune.cli import app
from querytune.label import LabelInputError, label, labeled_rows, read_labels


@dataclass
class FakePrediction:
    parse: dict | None
    valid: bool
    confidence: float
    error: str | None = None


class EchoBackend:
    """A backend at the edge of the unit tests: parses every text as a search for its first word; counts its
    calls and can crash after some, like a process killed mid-run."""

    model_version, schema_version = "m1", "s1"

    def __init__(self, crash_after: int | None = None):
        self.calls, self.seen, self.crash_after = 0, [], crash_after

    def parse(self, texts):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.seen += texts
        return [FakePrediction({"intent": "find_business", "slots": {"category": t.split()[0]}}, True, 0.9) for t in texts]


def write_inputs(folder: Path) -> int:
    """A folder with one log in each format, bad rows included; returns how many data rows it holds."""
    folder.mkdir()
    (folder / "a.csv").write_text("query,city\nCheap  Thai,austin\n\"multi\nline pizza\",austin\n,dallas\nx,y,extra\n24h plumber,nyc\n")
    lines = [json.dumps({"query": "cheap thai"}), "{broken", json.dumps({"q": "no field"}), "", json.dumps({"query": 7}),
             json.dumps({"query": "DENTIST\u00a0saturday"}), json.dumps({"query": "y" * 300})]
    (folder / "b.jsonl").write_text("\n".join(lines) + "\n")
    pd.DataFrame({"query": ["24h plumber", "barber", None, "dentist saturday"]}).to_parquet(folder / "c.parquet")
    return 5 + 6 + 4


def test_every_row_is_labeled_or_rejected_with_its_line(tmp_path):
    n = write_inputs(tmp_path / "in")
    backend = EchoBackend()
    summary = label(tmp_path / "in", tmp_path / "out", backend, shard_size=2)
    rows, rejects = pd.read_parquet(tmp_path / "out" / "rows.parquet"), [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert summary["rows"] == n and len(rows) + len(rejects) == n
    got = {(r["source"], r["line"]): r["reason"] for r in rejects}
    assert got == {("a.csv", 5): "empty query", ("a.csv", 6): "3 fields, the header has 2",
                   ("b.jsonl", 2): "not valid JSON: Expecting property name enclosed in double quotes at char 1",
                   ("b.jsonl", 3): "no field 'query'", ("b.jsonl", 5): "not text: int",
                   ("b.jsonl", 7): "longer than 256 characters (300)", ("c.parquet", 3): "missing query"}
    # the CSV's quoted two-line cell is one row starting on line 3, so the rows after it start on lines 5, 6 and 7
    assert list(rows[rows["source"] == "a.csv"]["line"]) == [2, 3, 7]
    distinct = {"cheap thai", "multi line pizza", "24h plumber", "dentist saturday", "barber"}
    assert sorted(backend.seen) == sorted(distinct), "each distinct normalised query is labeled exactly once"
    labels = read_labels(tmp_path / "out")
    assert set(labels["normalized"]) == distinct and labels["normalized"].is_unique
    assert set(labels["model_version"]) == {"m1"} and set(labels["schema_version"]) == {"s1"}
    joined = labeled_rows(tmp_path / "out")
    assert len(joined) == len(rows) and joined["parse"].notna().all()
    assert joined.set_index(["source", "line"]).loc[("b.jsonl", 6), "normalized"] == "dentist saturday"
    assert summary["distinct"] == 5 and summary["rejected"] == 7 and summary["labeled_now"] == 5


def test_a_crash_mid_run_resumes_without_loss_or_repeat(tmp_path):
    write_inputs(tmp_path / "in")
    with pytest.raises(KeyboardInterrupt):
        label(tmp_path / "in", tmp_path / "out", EchoBackend(crash_after=1), shard_size=2)
    assert len(read_labels(tmp_path / "out")) == 2, "the whole shard written before the crash stays"
    again = EchoBackend()
    summary = label(tmp_path / "in", tmp_path / "out", again, shard_size=2)
    assert summary["resumed"] == 2 and summary["labeled_now"] == 3 and len(again.seen) == 3
    labels = read_labels(tmp_path / "out")
    assert len(labels) == 5 and labels["normalized"].is_unique
    assert not list((tmp_path / "out" / "labels").glob(".*")), "no temporary shard is left behind"


def test_a_rerun_with_another_model_is_refused_until_restart(tmp_path):
    write_inputs(tmp_path / "in")
    label(tmp_path / "in", tmp_path / "out", EchoBackend())
    other = EchoBackend()
    other.model_version = "m2"
    with pytest.raises(LabelInputError, match="model_version: m1 -> m2"):
        label(tmp_path / "in", tmp_path / "out", other)
    summary = label(tmp_path / "in", tmp_path / "out", other, restart=True)
    assert summary["labeled_now"] == 5 and set(read_labels(tmp_path / "out")["model_version"]) == {"m2"}


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "q.csv").write_text("text\npizza\n"), "no column 'query' in the header (text)"),
    (lambda d: pd.DataFrame({"text": ["pizza"]}).to_parquet(d / "q.parquet"), "no column 'query'"),
    (lambda d: (d / "q.txt").write_text("pizza\n"), "no .csv, .json, .jsonl, .ndjson, .parquet files"),
])
def test_unusable_input_gets_a_clear_error(make, message, tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    make(tmp_path / "in")
    result = CliRunner().invoke(app, ["label", str(tmp_path / "in"), "--model", str(tiny_model), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_kill_9_and_rerun_gives_every_row_exactly_once(tiny_model, small_world_master, tmp_path):
    """The real CLI and model on the small world's log, killed with SIGKILL after its second shard, then run again."""
    log = pd.read_parquet(small_world_master / "log.parquet", columns=["query"]).head(600)
    log.to_parquet(tmp_path / "log.parquet")
    cmd = [sys.executable, "-c", "from querytune.cli import app; app()", "label", str(tmp_path / "log.parquet"), "--model", str(tiny_model),
           "--out", str(tmp_path / "out"), "--shard-size", "16", "--batch-size", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(list((tmp_path / "out" / "labels").glob("part-*.parquet"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: make the input larger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(read_labels(tmp_path / "out"))
    distinct = log["query"].map(lambda q: " ".join(q.lower().split())).nunique()
    assert 32 <= partial < distinct
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["resumed"] == partial and summary["labeled_now"] == distinct - partial
    labels = read_labels(tmp_path / "out")
    assert labels["normalized"].is_unique and len(labels) == distinct
    rows = labeled_rows(tmp_path / "out")
    assert len(rows) == len(log) and rows["valid"].notna().all(), "every input row has its label"
    assert (rows["parse"].notna() == rows["valid"]).all()


def test_ray_engine_labels_like_the_local_engine(tiny_model, small_world_master, tmp_path):
    """`--engine ray` on a local Ray cluster (two model replicas) writes the same labels as `--engine local`."""
    log = pd.read_parquet(small_world_master / "log.parquet", columns=["query"]).head(150)
    log.to_parquet(tmp_path / "log.parquet")
    outs = {}
    for engine in ("local", "ray"):
        result = CliRunner().invoke(app, ["label", str(tmp_path / "log.parquet"), "--model", str(tiny_model), "--out", str(tmp_path / engine),
                                          "--engine", engine, "--workers", "2", "--shard-size", "40", "--batch-size", "16"])
        assert result.exit_code == 0, result.output
        outs[engine] = read_labels(tmp_path / engine).sort_values("normalized").reset_index(drop=True)
    assert len(outs["ray"]) == len(outs["local"]) == log["query"].map(lambda q: " ".join(q.lower().split())).nunique()
    cols = ["normalized", "query", "parse", "valid", "error", "model_version", "schema_version"]
    pd.testing.assert_frame_equal(outs["ray"][cols], outs["local"][cols])
    assert (outs["ray"]["confidence"] - outs["local"]["confidence"]).abs().max() < 1e-4


def test_where_keeps_only_matching_rows(tmp_path):
    (tmp_path / "in").mkdir()
    pd.DataFrame({"query": ["a b", "c d", "e f"], "period": ["early", "late", "early"]}).to_parquet(tmp_path / "in" / "log.parquet")
    (tmp_path / "in" / "log.jsonl").write_text("".join(json.dumps({"query": q, "period": p}) + "\n" for q, p in [("g h", "late"), ("i j", "early")]))
    summary = label(tmp_path / "in", tmp_path / "out", EchoBackend(), where="period=early")
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert sorted(rows["normalized"]) == ["a b", "e f", "i j"] and list(rows[rows["source"] == "log.parquet"]["line"]) == [1, 3]
    assert summary["rows"] == 3
    with pytest.raises(LabelInputError, match="COLUMN=VALUE"):
        label(tmp_path / "in", tmp_path / "out2", EchoBackend(), where="period")
