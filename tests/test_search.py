from __future__ import annotations

import json
from datetime import datetime

import pandas as pd
import pytest
from typer.testing import CliRunner

from querytune.cli import app
from querytune.hours import hours_array, open_at
from querytune.schema_file import load_schema
from querytune.search import Context, Searcher, build_index

SCHEMA = load_schema()
FRIDAY_EVENING = datetime(2026, 10, 23, 19, 30)


@pytest.fixture()
def searcher(small_world, hash_embedder, tmp_path):
    catalog = pd.read_parquet(small_world / "catalog.parquet")
    build_index(catalog, tmp_path / "index", hash_embedder)
    return Searcher(tmp_path / "index", SCHEMA, embedder=hash_embedder)


def find(searcher, slots, city="boston", when=FRIDAY_EVENING, intent="find_business", k=10):
    return searcher.search(SCHEMA.parse({"intent": intent, "slots": slots}), Context(city, when), k)


def rows(searcher, ids):
    return searcher.catalog.set_index("business_id").loc[ids]


def test_index_is_saved_and_reloaded(searcher, small_world):
    catalog = pd.read_parquet(small_world / "catalog.parquet")
    assert searcher.index.ntotal == len(catalog)
    assert searcher.meta["kind"] == "flat" and searcher.meta["businesses"] == len(catalog)
    b = catalog.iloc[17]
    assert searcher.raw(b["text"], Context(b["city"], FRIDAY_EVENING), k=3)[0] == b["business_id"]


def test_where_comes_from_the_parse_or_the_context(searcher):
    assert set(rows(searcher, find(searcher, {"category": "plumber", "city": "austin"}))["city"]) == {"austin"}
    assert set(rows(searcher, find(searcher, {"category": "plumber", "near_me": True}, city="denver"))["city"]) == {
        "denver"
    }
    assert set(rows(searcher, find(searcher, {"category": "plumber"}, city="miami"))["city"]) == {"miami"}
    got = rows(searcher, find(searcher, {"category": "bar", "neighborhood": "soho", "city": "new york"}))
    assert set(got["neighborhood"]) == {"soho"}
    assert (
        find(searcher, {"category": "bar", "neighborhood": "harlem", "city": "austin"}) == []
    )  # a new york neighbourhood


def test_filters_come_first_and_relax_when_nothing_is_left(searcher):
    ny = searcher.catalog[searcher.catalog["city"] == "new york"]
    ok_in_city = (ny["price_level"] == 1) & open_at(hours_array(ny["hours"]), FRIDAY_EVENING.weekday(), 19 * 60 + 30)
    got = rows(searcher, find(searcher, {"price": "cheap", "open": "now"}, city="new york", intent="find_business"))
    ok = (got["price_level"].to_numpy() == 1) & open_at(
        hours_array(got["hours"]), FRIDAY_EVENING.weekday(), 19 * 60 + 30
    )
    assert ok.sum() == min(10, ok_in_city.sum()) and ok_in_city.sum() >= 3
    assert list(ok) == sorted(ok, reverse=True)  # satisfying businesses lead the page
    # a filter nobody meets still gives a full page from the same place
    impossible = find(
        searcher, {"category": "museum", "open": "24h", "price": "expensive", "min_rating": 5.0}, city="chicago"
    )
    assert len(impossible) == 10 and set(rows(searcher, impossible)["city"]) == {"chicago"}


def test_open_now_resolves_against_the_request_time(searcher):
    at_4am = datetime(2026, 10, 21, 4, 0)
    got = rows(searcher, find(searcher, {"category": "cafe", "open": "now"}, city="new york", when=at_4am, k=3))
    open_at_4am = open_at(hours_array(got["hours"]), at_4am.weekday(), 240)
    noon = rows(
        searcher,
        find(searcher, {"category": "cafe", "open": "now"}, city="new york", when=at_4am.replace(hour=12), k=3),
    )
    assert open_at(hours_array(noon["hours"]), at_4am.weekday(), 720).all()
    # at 4am few businesses are open: the filter relaxes to a full page from the city, and what is open then ranks in
    assert len(got) == 3 and set(got["city"]) == {"new york"}
    assert open_at_4am.sum() > open_at(hours_array(noon["hours"]), at_4am.weekday(), 240).sum()


def test_named_business_comes_first(searcher, small_world):
    catalog = pd.read_parquet(small_world / "catalog.parquet")
    b = catalog[catalog["city"] == "seattle"].iloc[5]
    got = find(searcher, {"business_name": b["name"]}, city="seattle", intent="find_named_business")
    assert got[0] == b["business_id"]


def test_hnsw_index_and_errors(small_world, hash_embedder, tmp_path):
    catalog = pd.read_parquet(small_world / "catalog.parquet")
    build_index(catalog, tmp_path / "hnsw", hash_embedder, kind="hnsw")
    s = Searcher(tmp_path / "hnsw", SCHEMA, embedder=hash_embedder)
    got = s.search(
        SCHEMA.parse({"intent": "find_business", "slots": {"category": "dentist", "city": "dallas"}}),
        Context("boston", FRIDAY_EVENING),
    )
    assert got and set(rows(s, got)["city"]) == {"dallas"}
    with pytest.raises(ValueError, match="kind"):
        build_index(catalog, tmp_path / "x", hash_embedder, kind="ivf-magic")
    with pytest.raises(FileNotFoundError, match="index build"):
        Searcher(tmp_path / "nothing", SCHEMA, embedder=hash_embedder)


def test_bm25_baseline_stays_in_the_user_city(searcher):
    got = searcher.bm25("thai restaurant", Context("portland", FRIDAY_EVENING))
    assert len(got) == 10 and set(rows(searcher, got)["city"]) == {"portland"}
    assert searcher.bm25("the of and", Context("portland", FRIDAY_EVENING))  # only stopwords: still a page


@pytest.mark.slow
def test_eval_retrieval_cli_with_real_embeddings(small_world_master, real_index, tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "retrieval",
            "--world",
            str(small_world_master),
            "--index",
            str(real_index),
            "--out",
            str(out),
            "--split",
            "dev",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for system in ("raw", "bm25", "oracle"):
        assert set(report[system]) == {"ndcg@10", "recall@10", "mrr"}
        assert all(0 <= v <= 1 for v in report[system].values())
    assert report["meta"]["n"] > 100 and report["meta"]["split"] == "dev"
    # understanding the query matters in this world
    assert report["oracle"]["ndcg@10"] > max(report["raw"]["ndcg@10"], report["bm25"]["ndcg@10"]) + 0.15
    assert set(report["slices"]["traffic"]) <= {"head", "torso", "tail"}


@pytest.mark.slow
def test_index_search_cli(real_index):
    result = CliRunner().invoke(
        app, ["index", "search", "--index", str(real_index), "--city", "austin", "24 hour plumber"]
    )
    assert result.exit_code == 0, result.output
    assert "austin" in result.output
    parse = json.dumps({"intent": "find_business", "slots": {"category": "plumber", "open": "24h"}})
    result = CliRunner().invoke(
        app, ["index", "search", "--index", str(real_index), "--city", "austin", "--parse", parse, "24 hour plumber"]
    )
    assert result.exit_code == 0 and "plumber" in result.output
    bad = CliRunner().invoke(app, ["index", "search", "--index", str(real_index), "--parse", '{"intent": "nope"}', "x"])
    assert bad.exit_code == 2 and "intent" in bad.output and "Traceback" not in bad.output
