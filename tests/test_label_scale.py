"""Labeling at scale: `prepare` (Arrow, a batch at a time) writes exactly what the per-row Python definition
(`account_rows` + `save_accounting`) writes, for every input format and every awkward cell; the Ray engine keeps
enough queries in flight per replica and asks for the GPUs it is told."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from querytune.labeling import label as labeling
from querytune.labeling import log_input, log_prepare

AWKWARD = [
    "Cheap Thai",
    "cheap  thai",
    "  Cheap\tTHAI\n",
    "a\x0bb\x0cc\rd",
    "x\x1cy\x1dz\x1e\x1fw",
    "DEL\x7fkept",
    "Café",
    "ＣＡＦＥ",
    "cafe",
    "ﬁsh tacos",
    "İstanbul kebab",
    "ΣΟΦΟΣ",
    "straße",
    "Ⅻ o'clock",
    "① pizza",
    "nbsp\u00a0here",
    "ideo\u3000space",
    "line\u2028sep",
    "next\u0085line",
    "zero\u200bwidth",
    "e\u0301clair",
    "🍕 near me",
    "مطعم",
    "寿司 近く",
    "Ａ",
    "a\x00b",
    "bell\x07",
    "\x1b[31mred",
    "",
    "   ",
    "\t\n",
    "\u00a0\u3000",
    "y" * 256,
    "y" * 257,
    "z " * 200,
    "㍿" * 80,
    "Ｙ" * 257,
    "a" + " " * 400 + "b",
]


def write_awkward(folder: Path, cells: list) -> None:
    """`cells` (text, None, numbers, bytes that are not UTF-8, ...) in every format `label` reads."""
    folder.mkdir()
    texts = [c for c in cells if isinstance(c, str)]
    jsonl = [json.dumps({"query": c}) for c in cells if not isinstance(c, bytes)]
    jsonl += [
        '{"query": "\\ud800 tacos"}',
        '"a bare string"',
        "[1, 2]",
        '{"q": "no field"}',
        "{broken",
        '{"query": 1e999}',
        '{"query": ' + "9" * 5000 + "}",
        '{"query": ["list"]}',
        '{"query": {"a": 1}}',
        '{"query": true}',
        "   ",
    ]
    (folder / "a.jsonl").write_bytes("\n".join(jsonl).encode() + b'\n{"query": "caf\xff"}\n')
    (folder / "b.ndjson").write_text("\n".join(json.dumps(c) for c in texts) + "\n")
    (folder / "c.json").write_text("\n".join(json.dumps({"query": c, "n": i}) for i, c in enumerate(texts)) + "\n")
    csv_cells = [
        c for c in texts if "\x00" not in c
    ]  # the csv module refuses NUL; that is the reader's affair, not normalising's
    pd.DataFrame({"query": csv_cells}).to_csv(folder / "d.csv", index=False)
    with open(folder / "d.csv", "ab") as f:
        f.write(b'caf\xe9 latte\n"' + b"x" * 200_000 + b'"\n,\nx,y\n')
    raw = [
        c.encode("utf-8", "surrogatepass") if isinstance(c, str) else c
        for c in cells
        if c is None or isinstance(c, (str, bytes))
    ]
    pq.write_table(
        pa.table({"query": pa.array(raw, pa.binary()).view(pa.string())}), folder / "e.parquet"
    )  # no UTF-8 check
    pq.write_table(pa.table({"query": pa.array(texts, pa.large_string())}), folder / "f.parquet")
    pd.DataFrame({"query": pd.Categorical(texts + [None])}).to_parquet(folder / "g.parquet")
    pq.write_table(pa.table({"query": pa.array([1, None, 3], pa.int64())}), folder / "h.parquet")
    pq.write_table(pa.table({"query": pa.array([b"bytes", None], pa.binary())}), folder / "i.parquet")


def outputs(input_path: Path, out: Path, new: bool, **kw) -> tuple:
    out.mkdir(parents=True)
    if new:
        prep = log_prepare.prepare(input_path, out, **kw)
        counts, distinct = (
            (prep.rows, prep.accepted, prep.rejected),
            list(zip(prep.distinct["normalized"].to_pylist(), prep.distinct["query"].to_pylist())),
        )
    else:
        acc = log_input.account_rows(input_path, **kw)
        labeling.save_accounting(acc, out)
        counts, distinct = (acc.rows, len(acc.mapping["line"]), len(acc.rejects)), list(acc.first_spelling.items())
    rows = pd.read_parquet(out / "rows.parquet")
    return (
        counts,
        [tuple(r) for r in rows[["source", "line", "normalized"]].itertuples(index=False)],
        (out / "rejects.jsonl").read_bytes(),
        distinct,
    )


def assert_same(input_path: Path, tmp_path: Path, **kw) -> tuple:
    old, new = outputs(input_path, tmp_path / "old", False, **kw), outputs(input_path, tmp_path / "new", True, **kw)
    assert new[0] == old[0], "rows, accepted, rejected"
    assert new[1] == old[1], "each accepted row's file, line and normalised query"
    assert new[2] == old[2], "rejects.jsonl, byte for byte"
    assert new[3] == old[3], "each distinct query with its first spelling, in order of first appearance"
    return new


def test_prepare_writes_what_the_per_row_definition_writes(tmp_path):
    write_awkward(tmp_path / "in", AWKWARD + [None, 7, 3.5, b"caf\xe9", b"\xed\xa0\x80 thai", b"ok \xff\xfe"])
    counts, rows, rejects, distinct = assert_same(tmp_path / "in", tmp_path)
    reasons = {json.loads(line)["reason"].split(" (")[0] for line in rejects.splitlines()}
    assert {
        "empty query",
        "missing query",
        "not text: int",
        "not text: float",
        "not text: bool",
        "not text: list",
        "not text: dict",
        "not text: bytes",
        "control characters",
        "longer than 256 characters",
        "no field 'query'",
    } <= reasons
    assert any(r.startswith("invalid UTF-8") for r in reasons) and any(r.startswith("not valid JSON") for r in reasons)
    assert any(r.startswith("not readable as CSV") for r in reasons) and any(
        r.endswith("the header has 1") for r in reasons
    )
    norms = {n for _, _, n in rows}
    assert {"cheap thai", "cafe", "fish tacos", "xii o'clock", "1 pizza", "x y z w", "y" * 256} <= norms, (
        "NFKC, case and whitespace applied"
    )
    assert dict(distinct)["cheap thai"] == "Cheap Thai" and counts[0] == counts[1] + counts[2]


def test_prepare_matches_on_random_cells_and_a_where_filter(tmp_path, monkeypatch):
    """Random cells from a pool of awkward characters, in batches smaller than the input so rows cross batch edges,
    and `--where` on a text column (with missing cells) and on a number column."""
    rng = random.Random(0)
    ascii = list("abcXYZ 019 -'&.  ") + ["\t", "\n", "\r", "\x0b", "\x1c", "\x1f", "\x7f"]
    pool = ascii + [
        "\x00",
        "\x07",
        "\u00a0",
        "\u3000",
        "é",
        "É",
        "ß",
        "İ",
        "Σ",
        "ﬁ",
        "①",
        "Ａ",
        "\u0301",
        "\u200b",
        "㍿",
        "🍕",
    ]
    cells = [
        "".join(rng.choices(rng.choice([ascii, pool]), k=rng.choice([0, 1, 3, 8, 20, 120, 255, 256, 257, 300])))
        for _ in range(1500)
    ]
    words = [
        "Thai",
        "PIZZA",
        "near",
        "me",
        "24h",
        "o'neil's",
        "a&b",
        "x" * 62,
        "\x7f",
        "é",
    ]  # plain ASCII mostly: Arrow's part
    cells += [
        " " * rng.choice([0, 0, 1, 2]) + " ".join(rng.choices(words, k=rng.randint(0, 6))) + " " * rng.choice([0, 0, 1])
        for _ in range(1500)
    ]
    cells += [c.upper() for c in cells[:500]] + [None] * 20
    rng.shuffle(cells)
    (tmp_path / "in").mkdir()
    periods = [rng.choice(["early", "late", None]) for _ in cells]
    pq.write_table(pa.table({"query": cells, "period": periods}), tmp_path / "in" / "a.parquet")
    pq.write_table(
        pa.table({"query": cells[:500], "period": [rng.choice([1, 2]) for _ in range(500)]}),
        tmp_path / "in" / "b.parquet",
    )
    (tmp_path / "in" / "c.jsonl").write_text(
        "".join(json.dumps({"query": c, "period": p}) + "\n" for c, p in zip(cells, periods))
    )
    monkeypatch.setattr(log_prepare, "BATCH_ROWS", 777)
    counts, _, _, distinct = assert_same(tmp_path / "in", tmp_path / "all")
    plain = len(cells) - log_prepare.normalize_plain(pa.array(cells, pa.large_string()))[0].null_count
    assert 0.25 < plain / len(cells) < 0.75, "both Arrow's part and check_query's part are put to the test"
    assert counts[0] == 2 * len(cells) + 500 and 1000 < len(distinct) < counts[1] < counts[0]
    for where in ("period=late", "period=None", "period=1"):
        assert_same(tmp_path / "in", tmp_path / where, where=where)
    assert_same(tmp_path / "in", tmp_path / "short", max_chars=10)


def test_prepare_names_an_unreadable_or_columnless_parquet_file(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(log_input.LabelInputError, match="a.parquet: not a readable Parquet file"):
        log_prepare.prepare(tmp_path / "in", tmp_path)
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "in" / "a.parquet")
    with pytest.raises(log_input.LabelInputError, match=r"no column 'query' \(columns: text\)"):
        log_prepare.prepare(tmp_path / "in", tmp_path)
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "rows.parquet").exists(), (
        "a failed read leaves nothing behind"
    )


def test_ray_replicas_reserve_their_share_of_a_gpu(tiny_model, small_world_master, monkeypatch):
    """Two replicas asking 0.25 GPU each, on a local cluster that declares one GPU (none is there: they run the
    transformers backend on CPU), hold half the GPU while they label, and label as the local engine does."""
    import ray

    from querytune.labeling import ray_engine
    from querytune.labeling.label import parse_rows
    from querytune.query import check_query
    from querytune.runtime.backends import load_backend

    log = pd.read_parquet(small_world_master / "log.parquet", columns=["query"])["query"].head(80)
    queries = sorted({check_query(q)[0] for q in log})
    monkeypatch.setattr(
        ray_engine, "QUERIES_IN_FLIGHT", 32
    )  # blocks of 8: the replicas are still at work when the first shard is back
    ray.init(num_cpus=3, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        engine = ray_engine.RayEngine(tiny_model, workers=2, batch_size=8, gpus_per_replica=0.25)
        rows, gpus_free = [], None
        for shard in engine.stream(queries, 8):
            gpus_free = ray.available_resources().get("GPU", 0.0) if gpus_free is None else gpus_free
            rows += shard
    finally:
        ray.shutdown()
    assert gpus_free == pytest.approx(0.5)
    local = {r["normalized"]: r for r in parse_rows(load_backend("transformers", tiny_model, batch_size=8), queries)}
    assert sorted(r["normalized"] for r in rows) == queries
    for r in rows:
        assert (r["parse"], r["valid"]) == (local[r["normalized"]]["parse"], local[r["normalized"]]["valid"])
        assert r["confidence"] == pytest.approx(local[r["normalized"]]["confidence"], abs=1e-4)


def test_gpus_per_replica_is_for_ray_with_vllm(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from querytune.cli import app

    (tmp_path / "log.jsonl").write_text('{"query": "pizza"}\n')
    result = CliRunner().invoke(
        app,
        [
            "label",
            str(tmp_path / "log.jsonl"),
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path / "out"),
            "--engine",
            "ray",
            "--gpus-per-replica",
            "0.25",
        ],
    )
    assert result.exit_code == 2 and "--gpus-per-replica needs --engine ray --backend vllm" in result.output
    assert "--gpus-per-replica" in CliRunner().invoke(app, ["label", "--help"]).output
