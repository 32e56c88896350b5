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
from querytune.labeling.label import label, labeled_rows, read_labels
from querytune.labeling.log_input import LabelInputError


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
        return [
            FakePrediction({"intent": "find_business", "slots": {"category": t.split()[0]}}, True, 0.9) for t in texts
        ]


def write_inputs(folder: Path) -> int:
    """A folder with one log in each format, bad rows included; returns how many data rows it holds."""
    folder.mkdir()
    (folder / "a.csv").write_text(
        'query,city\nCheap  Thai,austin\n"multi\nline pizza",austin\n,dallas\nx,y,extra\n24h plumber,nyc\n'
    )
    lines = [
        json.dumps({"query": "cheap thai"}),
        "{broken",
        json.dumps({"q": "no field"}),
        "",
        json.dumps({"query": 7}),
        json.dumps({"query": "DENTIST\u00a0saturday"}),
        json.dumps({"query": "y" * 300}),
    ]
    (folder / "b.jsonl").write_text("\n".join(lines) + "\n")
    pd.DataFrame({"query": ["24h plumber", "barber", None, "dentist saturday"]}).to_parquet(folder / "c.parquet")
    return 5 + 6 + 4


def test_every_row_is_labeled_or_rejected_with_its_line(tmp_path):
    n = write_inputs(tmp_path / "in")
    backend = EchoBackend()
    summary = label(tmp_path / "in", tmp_path / "out", backend, shard_size=2)
    rows, rejects = (
        pd.read_parquet(tmp_path / "out" / "rows.parquet"),
        [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()],
    )
    assert summary["rows"] == n and len(rows) + len(rejects) == n
    got = {(r["source"], r["line"]): r["reason"] for r in rejects}
    assert got == {
        ("a.csv", 5): "empty query",
        ("a.csv", 6): "3 fields, the header has 2",
        ("b.jsonl", 2): "not valid JSON: Expecting property name enclosed in double quotes at char 1",
        ("b.jsonl", 3): "no field 'query'",
        ("b.jsonl", 5): "not text: int",
        ("b.jsonl", 7): "longer than 256 characters (300)",
        ("c.parquet", 3): "missing query",
    }
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


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "q.csv").write_text("text\npizza\n"), "no column 'query' in the header (text)"),
        (lambda d: pd.DataFrame({"text": ["pizza"]}).to_parquet(d / "q.parquet"), "no column 'query'"),
        (lambda d: (d / "q.txt").write_text("pizza\n"), "no .csv, .json, .jsonl, .ndjson, .parquet files"),
    ],
)
def test_unusable_input_gets_a_clear_error(make, message, tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    make(tmp_path / "in")
    result = CliRunner().invoke(
        app, ["label", str(tmp_path / "in"), "--model", str(tiny_model), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_kill_9_and_rerun_gives_every_row_exactly_once(tiny_model, small_world_master, tmp_path):
    """The real CLI and model on the small world's log, killed with SIGKILL after its second shard, then run again."""
    log = pd.read_parquet(small_world_master / "log.parquet", columns=["query"]).head(600)
    log.to_parquet(tmp_path / "log.parquet")
    cmd = [
        sys.executable,
        "-c",
        "from querytune.cli import app; app()",
        "label",
        str(tmp_path / "log.parquet"),
        "--model",
        str(tiny_model),
        "--out",
        str(tmp_path / "out"),
        "--shard-size",
        "16",
        "--batch-size",
        "16",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while (
        len(list((tmp_path / "out" / "labels").glob("part-*.parquet"))) < 2
        and proc.poll() is None
        and time.time() < deadline
    ):
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


def test_ray_engine_labels_like_the_local_engine(tiny_model, small_world_master, tmp_path, monkeypatch):
    """`--engine ray` on a local Ray cluster (two model replicas) writes the same labels as `--engine local`; the
    queries travel in blocks of whole batches, each replica `TASKS_PER_REPLICA` blocks ahead, on no GPU."""
    import ray

    from querytune.labeling import ray_engine

    log = pd.read_parquet(small_world_master / "log.parquet", columns=["query"]).head(150)
    log.to_parquet(tmp_path / "log.parquet")
    monkeypatch.setattr(
        ray_engine, "QUERIES_IN_FLIGHT", 100
    )  # blocks of 32 (two batches of 16), so the 120-odd queries make several
    seen, from_arrow, map_batches = {}, ray.data.from_arrow, ray.data.Dataset.map_batches

    def spy_from_arrow(blocks):
        seen["blocks"] = [b.num_rows for b in blocks]
        return from_arrow(blocks)

    def spy_map_batches(self, fn, **options):
        seen["options"] = options
        return map_batches(self, fn, **options)

    monkeypatch.setattr(ray.data, "from_arrow", spy_from_arrow)
    monkeypatch.setattr(ray.data.Dataset, "map_batches", spy_map_batches)
    outs = {}
    for engine in ("local", "ray"):
        result = CliRunner().invoke(
            app,
            [
                "label",
                str(tmp_path / "log.parquet"),
                "--model",
                str(tiny_model),
                "--out",
                str(tmp_path / engine),
                "--engine",
                engine,
                "--workers",
                "2",
                "--shard-size",
                "40",
                "--batch-size",
                "16",
            ],
        )
        assert result.exit_code == 0, result.output
        outs[engine] = read_labels(tmp_path / engine).sort_values("normalized").reset_index(drop=True)
    assert len(outs["ray"]) == len(outs["local"]) == log["query"].map(lambda q: " ".join(q.lower().split())).nunique()
    cols = ["normalized", "query", "parse", "valid", "error", "model_version", "schema_version"]
    pd.testing.assert_frame_equal(outs["ray"][cols], outs["local"][cols])
    assert (outs["ray"]["confidence"] - outs["local"]["confidence"]).abs().max() < 1e-4
    assert set(seen["blocks"][:-1]) == {32} and sum(seen["blocks"]) == len(outs["ray"])
    options = seen["options"]
    assert options["batch_size"] == 16 and options["num_gpus"] == 0 and options["num_cpus"] == 1
    assert options["compute"] == ray.data.ActorPoolStrategy(
        size=2, max_tasks_in_flight_per_actor=ray_engine.TASKS_PER_REPLICA
    )
    assert ray_engine.TASKS_PER_REPLICA * 32 >= 100, "each replica holds at least QUERIES_IN_FLIGHT queries"


def test_where_keeps_only_matching_rows(tmp_path):
    (tmp_path / "in").mkdir()
    pd.DataFrame({"query": ["a b", "c d", "e f"], "period": ["early", "late", "early"]}).to_parquet(
        tmp_path / "in" / "log.parquet"
    )
    (tmp_path / "in" / "log.jsonl").write_text(
        "".join(json.dumps({"query": q, "period": p}) + "\n" for q, p in [("g h", "late"), ("i j", "early")])
    )
    summary = label(tmp_path / "in", tmp_path / "out", EchoBackend(), where="period=early")
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert sorted(rows["normalized"]) == ["a b", "e f", "i j"] and list(
        rows[rows["source"] == "log.parquet"]["line"]
    ) == [1, 3]
    assert summary["rows"] == 3
    with pytest.raises(LabelInputError, match="COLUMN=VALUE"):
        label(tmp_path / "in", tmp_path / "out2", EchoBackend(), where="period")


def test_a_bad_row_in_any_format_is_rejected_not_fatal(tmp_path):
    """A lone surrogate, a 5,000-digit number, invalid UTF-8, JSON nested past the parser's depth or a CSV field past
    the csv module's limit spoils its own row only: it lands in rejects.jsonl with its file, line and reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(
        b"\n".join(
            [
                b'{"query": "pizza"}',
                b'{"query": "\\ud800 tacos"}',
                b'{"query": ' + b"9" * 5000 + b"}",
                b'{"query": "caf\xff"}',
                b"[" * 100_000,
                b'{"query": "sushi"}',
            ]
        )
        + b"\n"
    )
    (tmp_path / "in" / "b.csv").write_bytes(b'query\nbarber\ncaf\xe9 latte\n"' + b"x" * 200_000 + b'"\nnails\n')
    invalid = pa.array([b"dentist", b"caf\xff", None], pa.binary()).view(
        pa.string()
    )  # a writer that skipped UTF-8 checks
    pq.write_table(pa.table({"query": invalid}), tmp_path / "in" / "c.parquet")
    summary = label(tmp_path / "in", tmp_path / "out", EchoBackend())
    rejects = {
        (r["source"], r["line"]): r
        for r in map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text(encoding="utf-8").splitlines())
    }
    reasons = {k: r["reason"] for k, r in rejects.items()}
    assert set(reasons) == {
        ("a.jsonl", 2),
        ("a.jsonl", 3),
        ("a.jsonl", 4),
        ("a.jsonl", 5),
        ("b.csv", 3),
        ("b.csv", 4),
        ("c.parquet", 2),
        ("c.parquet", 3),
    }
    assert "lone surrogate" in reasons[("a.jsonl", 2)] and "U+D800" in reasons[("a.jsonl", 2)]
    assert "more than 4300 digits" in reasons[("a.jsonl", 3)]
    assert (
        "invalid UTF-8" in reasons[("a.jsonl", 4)]
        and "invalid UTF-8" in reasons[("b.csv", 3)]
        and "invalid UTF-8" in reasons[("c.parquet", 2)]
    )
    assert "nested too deeply" in reasons[("a.jsonl", 5)] and "field larger than field limit" in reasons[("b.csv", 4)]
    assert rejects[("b.csv", 3)]["raw"] == "caf\\xe9 latte", "the raw cell shows the bad byte"
    assert sorted(read_labels(tmp_path / "out")["normalized"]) == ["barber", "dentist", "nails", "pizza", "sushi"]
    assert summary["rows"] == 13 and summary["rejected"] == 8


def test_an_unreadable_shard_is_set_aside_and_relabeled(tmp_path, capsys):
    """A torn shard (a copy cut short, a full disk) or a zero-byte one never blocks a resume: it is renamed
    `*.corrupt` with a warning naming it, and its queries are labeled again, so each is labeled exactly once."""
    write_inputs(tmp_path / "in")
    label(tmp_path / "in", tmp_path / "out", EchoBackend(), shard_size=2)
    shards = sorted((tmp_path / "out" / "labels").glob("part-*.parquet"))
    assert len(shards) == 3
    shards[0].write_bytes(shards[0].read_bytes()[:-20])  # torn
    shards[2].write_bytes(b"")  # zero bytes
    lost = 2 + 1
    again = EchoBackend()
    summary = label(tmp_path / "in", tmp_path / "out", again, shard_size=2)
    assert summary["resumed"] == 5 - lost and summary["labeled_now"] == lost and len(again.seen) == lost
    labels = read_labels(tmp_path / "out")
    assert len(labels) == 5 and labels["normalized"].is_unique
    assert sorted(p.name for p in (tmp_path / "out" / "labels").glob("*.corrupt")) == [
        "part-00000.parquet.corrupt",
        "part-00002.parquet.corrupt",
    ]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and str(shards[0]) in warnings[0] and "part-00000.parquet.corrupt" in warnings[0]


def test_a_second_run_on_a_locked_folder_is_refused(tiny_model, tmp_path):
    """While one run writes a labeling folder another refuses at once (exit 2, one line naming the folder); the lock
    dies with its process, so a run killed with SIGKILL leaves a folder the next run can resume."""
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom querytune.labeling.label import lock_folder\n"
            f"with lock_folder({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LabelInputError, match="another run"):
            label(tmp_path / "in", out, EchoBackend())
        result = CliRunner().invoke(app, ["label", str(tmp_path / "in"), "--model", str(tiny_model), "--out", str(out)])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert (
            result.stderr.strip().startswith(f"error: {out}: another run")
            and len(result.stderr.strip().splitlines()) == 1
        )
    finally:
        holder.kill()
        holder.wait()
    assert label(tmp_path / "in", out, EchoBackend())["labeled_now"] == 5


def test_int8_labels_with_a_quantised_decoder_and_only_on_transformers(tiny_model, small_world_master, tmp_path):
    import torch

    from querytune.runtime.generate import Parser

    parser = Parser(tiny_model, constrained=True, int8=True)
    kinds = {
        name.rsplit(".", 1)[-1]: type(m).__module__ for name, m in parser.model.named_modules() if name.count(".") >= 4
    }
    assert "quantized" in kinds["q_proj"] and "quantized" in kinds["up_proj"], "attention and MLP inputs are int8"
    assert kinds["down_proj"] == torch.nn.Linear.__module__ and isinstance(parser.model.lm_head, torch.nn.Linear), (
        "down projections and head stay fp32"
    )
    log = pd.read_parquet(small_world_master / "log.parquet", columns=["query"]).head(60)
    log.to_parquet(tmp_path / "log.parquet")
    result = CliRunner().invoke(
        app,
        ["label", str(tmp_path / "log.parquet"), "--model", str(tiny_model), "--out", str(tmp_path / "out"), "--int8"],
    )
    assert result.exit_code == 0, result.output
    labels = read_labels(tmp_path / "out")
    assert (
        len(labels) == log["query"].map(lambda q: " ".join(q.lower().split())).nunique()
        and labels["valid"].mean() > 0.5
    )
    refused = CliRunner().invoke(
        app,
        [
            "label",
            str(tmp_path / "log.parquet"),
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path / "v"),
            "--int8",
            "--backend",
            "vllm",
        ],
    )
    assert refused.exit_code == 2 and "--int8: only the transformers backend" in refused.output


@pytest.mark.parametrize(
    "make, out, message",
    [
        (lambda t: (t / "f").write_text("x"), "f", "exists and is not a folder"),
        (lambda t: (t / "o" / "labels").parent.mkdir() or (t / "o" / "labels").write_text("x"), "o", "is a file"),
        (lambda t: None, "", "--out: give a folder"),
    ],
    ids=["out-is-a-file", "labels-is-a-file", "out-empty"],
)
def test_an_unusable_out_folder_is_one_line_and_writes_nothing(make, out, message, tiny_model, tmp_path, monkeypatch):
    write_inputs(tmp_path / "in")
    make(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, ["label", "in", "--model", str(tiny_model), "--out", out])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_restart_never_deletes_through_a_linked_labels_folder(tmp_path):
    """`--restart` deletes shards: a `labels/` that is a link to a folder elsewhere is refused, and what it points
    at is left as it was."""
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    label(tmp_path / "in", out, EchoBackend())
    elsewhere = tmp_path / "elsewhere"
    (out / "labels").rename(elsewhere)
    (out / "labels").symlink_to(elsewhere)
    kept = sorted(p.name for p in elsewhere.iterdir())
    with pytest.raises(LabelInputError, match="symbolic link"):
        label(tmp_path / "in", out, EchoBackend(), restart=True)
    assert sorted(p.name for p in elsewhere.iterdir()) == kept and kept


@pytest.mark.parametrize("torn", [lambda b: b[: len(b) // 2], lambda b: b"", lambda b: b"[]", lambda b: b"\xff\xfe"])
def test_an_unreadable_manifest_is_rebuilt_from_the_shards_keeping_every_label(torn, tmp_path, capsys):
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    label(tmp_path / "in", out, EchoBackend(), shard_size=2)
    (out / "manifest.json").write_bytes(torn((out / "manifest.json").read_bytes()))
    again = EchoBackend()
    summary = label(tmp_path / "in", out, again, shard_size=2)
    assert summary["labeled_now"] == 0 and summary["resumed"] == 5 and again.seen == []
    assert "rebuilt from the shards" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["model_version"] == "m1"
    other = EchoBackend()
    other.model_version = "m2"
    (out / "manifest.json").write_text("{")
    with pytest.raises(LabelInputError, match="another run .*model m1"):
        label(tmp_path / "in", out, other)


def test_a_line_too_long_is_a_reject_with_an_excerpt_read_in_pieces(tmp_path, monkeypatch):
    """A line over the limit is never held whole: it is read past in pieces and rejected with a short excerpt."""
    import querytune.labeled as labeled

    monkeypatch.setattr(labeled, "MAX_LINE_CHARS", 1000)
    (tmp_path / "in").mkdir()
    long_line = json.dumps({"query": "x" * 50_000})
    (tmp_path / "in" / "a.jsonl").write_text(f'{{"query": "pizza"}}\n{long_line}\n{{"query": "sushi"}}\n')
    (tmp_path / "in" / "b.csv").write_text(f"query\nramen\n{'y' * 50_000}\ntacos\n")
    summary = label(tmp_path / "in", tmp_path / "out", EchoBackend())
    assert summary["accepted"] == 4 and summary["rejected"] == 2
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["line"]) for r in rejects] == [("a.jsonl", 2), ("b.csv", 3)]
    assert all("longer than 1,000 characters" in r["reason"] and len(json.dumps(r)) < 600 for r in rejects)
