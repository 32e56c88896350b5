"""`querytune eval diff`: two real (tiny, memorised) models that differ on known queries; the diff lists exactly
those, heaviest traffic first, with the retrieval effect of each change."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from querytune.cli import app

QUERIES = 8


@pytest.fixture(scope="module")
def two_models(tiny_base, small_world_master, tmp_path_factory) -> tuple[Path, Path, list[dict], list[int]]:
    from conftest import memorise_parses

    from querytune.schema import normalize_text

    seed = [json.loads(line) for line in (small_world_master / "seed.jsonl").read_text().splitlines()]
    rows = [
        r | {"text": normalize_text(r["text"])} for r in seed if r["intent"] == "find_business" and len(r["slots"]) >= 2
    ][:QUERIES]
    changed = [1, 4, 6]  # model B drops one slot of these
    b_rows = []
    for i, r in enumerate(rows):
        if i in changed:
            dropped = sorted(k for k in r["slots"] if k != "category")[0]
            r = r | {"slots": {k: v for k, v in r["slots"].items() if k != dropped}}
        b_rows.append(r)
    a = memorise_parses(tiny_base, rows, tmp_path_factory.mktemp("diff-a"))
    b = memorise_parses(tiny_base, b_rows, tmp_path_factory.mktemp("diff-b"))
    from querytune.runtime.backends import TransformersBackend

    for folder, want in (
        (a, rows),
        (b, b_rows),
    ):  # each model writes its parses: the known differences are the only ones
        got = [p.parse for p in TransformersBackend(folder).parse([r["text"] for r in want])]
        assert got == [{"intent": r["intent"], "slots": r["slots"]} for r in want]
    return a, b, rows, changed


def test_diff_lists_exactly_the_changed_queries_by_traffic(two_models, real_index, small_world_master, tmp_path):
    a, b, rows, changed = two_models
    catalog = pd.read_parquet(small_world_master / "catalog.parquet")
    log = []
    for i, r in enumerate(
        rows
    ):  # query i is typed i + 1 times, in upper case half the time (one query after normalising)
        for n in range(i + 1):
            log.append(
                {
                    "query": r["text"].upper() if n % 2 else r["text"],
                    "user_city": r["user_city"],
                    "timestamp": r["timestamp"],
                    "clicked": list(catalog["business_id"].head(2)),
                }
            )
    pd.DataFrame(log).to_parquet(tmp_path / "log.parquet")
    out = tmp_path / "diff.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "diff",
            str(a),
            str(b),
            "--log",
            str(tmp_path / "log.parquet"),
            "--index",
            str(real_index),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    from querytune.schema import normalize_text

    got = [c["query"] for c in report["changed"]]
    want = [normalize_text(rows[i]["text"]) for i in sorted(changed, reverse=True)]  # more traffic first
    assert got == want
    s = report["summary"]
    assert s["compared_queries"] == QUERIES and s["changed_queries"] == 3
    assert s["changed_traffic_share"] == pytest.approx(sum(i + 1 for i in changed) / len(log), abs=1e-4)
    for c in report["changed"]:
        assert c["change"].startswith("-") and c["a"]["slots"] != c["b"]["slots"]
        assert -1.0 <= c["reward_a"] <= 1.0 and -1.0 <= c["reward_b"] <= 1.0
    assert "change parse" in result.output


def test_diff_of_labeling_folders_and_clear_errors(tmp_path):
    from querytune.labeling.label import LABEL_COLUMNS

    def folder(name: str, parses: dict[str, dict]) -> Path:
        d = tmp_path / name
        (d / "labels").mkdir(parents=True)
        (d / "manifest.json").write_text("{}")
        pd.DataFrame(
            [
                {
                    "query": q,
                    "normalized": q,
                    "parse": json.dumps(p),
                    "valid": True,
                    "confidence": 1.0,
                    "error": None,
                    "model_version": name,
                    "schema_version": "s",
                }
                for q, p in parses.items()
            ],
            columns=LABEL_COLUMNS,
        ).to_parquet(d / "labels" / "part-00000.parquet")
        return d

    thai = {"intent": "find_business", "slots": {"category": "restaurant", "cuisine": "thai"}}
    a = folder("a", {"thai food": thai, "plumber": {"intent": "find_business", "slots": {"category": "plumber"}}})
    b = folder(
        "b",
        {
            "thai food": {"intent": "find_business", "slots": {"category": "restaurant"}},
            "plumber": {"intent": "find_business", "slots": {"category": "plumber"}},
        },
    )
    pd.DataFrame({"query": ["thai food"] * 3 + ["Plumber"]}).to_csv(tmp_path / "log.csv", index=False)
    out = tmp_path / "d.json"
    result = CliRunner().invoke(
        app, ["eval", "diff", str(a), str(b), "--log", str(tmp_path / "log.csv"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [c["query"] for c in report["changed"]] == ["thai food"] and report["changed"][0][
        "change"
    ] == "-cuisine=thai"
    assert report["summary"]["changed_traffic_share"] == 0.75
    bad = CliRunner().invoke(
        app, ["eval", "diff", str(a), str(b), "--log", str(tmp_path / "log.csv"), "--column", "text"]
    )
    assert bad.exit_code != 0 and "no column 'text'" in bad.output
