"""`querytune world traffic`: the world's requests replayed through the serving service and clicked by its users;
the same bytes for the same inputs, and users whose choices do not depend on what the policy shows."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from querytune.cli import app

DAYS = "30-33"


def traffic(world, model, index, out, share: float, *extra: str) -> pd.DataFrame:
    result = CliRunner().invoke(
        app,
        [
            "world", "traffic", "--world", str(world), "--model", str(model), "--index", str(index),
            "--days", DAYS, "--explore-share", str(share), "--out", str(out), *extra,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "regret" in result.output
    return pd.read_parquet(out / "log.parquet")


@pytest.mark.slow
def test_traffic_is_deterministic_logs_propensities_and_its_users_ignore_the_policy(
    tiny_model, small_world_master, real_index, tmp_path
):
    explored = traffic(small_world_master, tiny_model, real_index, tmp_path / "a", 0.5)
    again = traffic(small_world_master, tiny_model, real_index, tmp_path / "b", 0.5)
    assert (tmp_path / "a" / "log.parquet").read_bytes() == (tmp_path / "b" / "log.parquet").read_bytes()
    assert (tmp_path / "a" / "audit" / "regret.json").read_text() == (
        tmp_path / "b" / "audit" / "regret.json"
    ).read_text()
    assert explored.equals(again)

    log = pd.read_parquet(small_world_master / "log.parquet")
    day = (log["timestamp"] - log["timestamp"].min().normalize()).dt.days
    assert explored["query_id"].tolist() == log.loc[day.between(30, 33), "query_id"].tolist()

    bucket = explored[explored["policy"] == "explore"]
    assert 0.3 * len(explored) < len(bucket) < 0.6 * len(explored)
    moved = 0
    for row in bucket.itertuples():
        candidates = json.loads(row.candidates)
        assert sum(c["p"] for c in candidates) == pytest.approx(1.0)
        assert row.propensity == next(c["p"] for c in candidates if json.dumps(c["parse"], sort_keys=True) == row.parse)
        assert all(0 < p <= 1 for p in row.display_p)
        moved += len(candidates) > 1
    assert moved > 0, "some bucket request had a candidate besides its greedy parse"
    greedy = explored[explored["policy"] == "greedy"]
    assert (greedy["propensity"] == 1.0).all() and greedy["candidates"].isna().all()

    # the same rows served greedily: outside the bucket every shown list and click is the same
    plain = traffic(small_world_master, tiny_model, real_index, tmp_path / "c", 0.0).set_index("query_id")
    assert (plain["policy"] == "greedy").all()
    same = plain.loc[greedy["query_id"]]
    assert [list(x) for x in same["shown"]] == [list(x) for x in greedy["shown"]]
    assert [list(x) for x in same["clicked"]] == [list(x) for x in greedy["clicked"]]
    # the truth an off-policy estimate is checked against: the bucket's requests alone, served greedily
    truth = traffic(
        small_world_master,
        tiny_model,
        real_index,
        tmp_path / "d",
        0.0,
        "--bucket-of",
        str(tmp_path / "a" / "log.parquet"),
    )
    assert truth["query_id"].tolist() == bucket["query_id"].tolist()
    assert (
        truth.set_index("query_id")[["shown", "clicked"]]
        .map(list)
        .equals(plain.loc[bucket["query_id"], ["shown", "clicked"]].map(list))
    )
    # the served model judged on its own bucket: its greedy parse is always a candidate
    result = CliRunner().invoke(
        app,
        ["eval", "offpolicy", "--log", str(tmp_path / "a" / "log.parquet"), "--model", f"served={tiny_model}",
         "--model", f"again={tiny_model}", "--out", str(tmp_path / "ope.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ope = json.loads((tmp_path / "ope.json").read_text())
    assert ope["models"]["served"]["support"] == 1.0
    greedy_served = sum(
        json.loads(c)[0]["parse"] == json.loads(p) for c, p in zip(bucket["candidates"], bucket["parse"])
    )
    assert ope["models"]["served"]["matched"] == greedy_served
    assert ope["models"]["again"]["vs_first"]["difference"] == 0.0
    # the served model's parses are read from the log's candidates; decoding them again gives the same ones
    from querytune.evaluation.offpolicy import model_parses, read_bucket
    from querytune.runtime.backends import load_backend, parse_many

    logged = read_bucket(tmp_path / "a" / "log.parquet")
    backend = load_backend("transformers", tiny_model)
    texts = list(model_parses(backend, logged))
    decoded = {t: p.parse if p.valid else None for t, p in parse_many(backend, texts).items()}
    assert model_parses(backend, logged) == decoded
    # a promotion gated on the bucket: the served model again does not beat itself
    from querytune.serving.cache import open_cache

    cache = f"sqlite:///{tmp_path}/cache.db"
    open_cache(cache, create=True)  # promote opens only a cache that exists
    first = CliRunner().invoke(app, ["cache", "promote", "--model", str(tiny_model), "--cache", cache, "--force"])
    assert first.exit_code == 0, first.output
    gated = CliRunner().invoke(
        app,
        ["cache", "promote", "--model", str(tiny_model), "--cache", cache, "--force",
         "--offpolicy-log", str(tmp_path / "a" / "log.parquet")],
    )  # fmt: skip
    assert gated.exit_code == 2
    assert "not promoted" in gated.output and "does not beat the active model" in gated.output
    regret = json.loads((tmp_path / "a" / "audit" / "regret.json").read_text())
    assert regret["all"]["requests"] > 0 and regret["bucket"]["requests"] > 0
    assert json.loads((tmp_path / "c" / "audit" / "regret.json").read_text())["all"]["regret"] == 0.0

    # the next round's world: the log and the traffic, no audit/, and the bucket outside the position-bias fit
    result = CliRunner().invoke(
        app,
        ["world", "extend", "--world", str(small_world_master), "--traffic", str(tmp_path / "a" / "log.parquet"),
         "--out", str(tmp_path / "next")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "next" / "audit").exists()
    assert (tmp_path / "next" / "seed.jsonl").read_bytes() == (small_world_master / "seed.jsonl").read_bytes()
    merged = pd.read_parquet(tmp_path / "next" / "log.parquet")
    assert len(merged) == len(log) + len(explored) and merged["query_id"].is_unique
    from querytune.train.clicks import estimate_propensity

    assert estimate_propensity(merged) == estimate_propensity(
        pd.concat([log, explored[explored["policy"] != "explore"]])
    )


def test_traffic_names_a_bad_day_span(tmp_path):
    result = CliRunner().invoke(
        app,
        ["world", "traffic", "--world", str(tmp_path), "--model", str(tmp_path), "--index", str(tmp_path),
         "--days", "9-3", "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--days '9-3': A-B with 0 <= A <= B" in result.output


def test_the_placebo_moves_bucket_clicks_within_a_term_and_city_and_nothing_else():
    from querytune.world.traffic import permuted_clicks

    rows = [
        ("washeteria", "austin", "explore", ["a", "b", "c"], ["a"]),
        ("Washeteria", "austin", "explore", ["d", "e", "f"], ["e", "f"]),
        ("washeteria", "austin", "explore", ["g", "h", "i"], []),
        ("washeteria", "miami", "explore", ["j", "k"], ["k"]),  # alone in its city: nothing to swap with
        ("washeteria", "austin", "greedy", ["l", "m"], ["m"]),  # outside the bucket: untouched
    ]
    log = pd.DataFrame(rows, columns=["query", "user_city", "policy", "shown", "clicked"])
    moved_any = False
    for seed in range(6):
        placebo, moved = permuted_clicks(log, seed)
        positions = sorted(
            tuple(list(s).index(b) for b in c) for s, c in zip(placebo["shown"][:3], placebo["clicked"][:3])
        )
        assert positions == [(), (0,), (1, 2)], "the group's click positions, redistributed"
        assert all(set(c) <= set(s) for s, c in zip(placebo["shown"], placebo["clicked"]))
        assert list(placebo["clicked"][3:]) == [["k"], ["m"]]
        moved_any |= moved > 0
    assert moved_any
    # with the seed's words known, a new word's texts are one term: typed once each, their clicks still move
    texts = pd.DataFrame(
        [("washeteria near me", ["a", "b"], ["a"]), ("cheap washeteria", ["c", "d"], ["d"]), ("pizza", ["e"], ["e"])],
        columns=["query", "shown", "clicked"],
    ).assign(user_city="austin", policy="explore")
    known = frozenset({"cheap", "pizza"})
    assert permuted_clicks(texts, 0)[1] == 0, "each text alone in its group: nothing moves"
    moves = [permuted_clicks(texts, seed, known) for seed in range(8)]
    assert any(n == 2 for _, n in moves), "the two washeteria texts swap their click positions"
    assert all(list(p["clicked"][2:]) == [["e"]] for p, _ in moves), "pizza, a known word, is a term of its own"


def test_the_next_round_labels_the_texts_the_bucket_explored_first(small_world_master, tmp_path):
    """`early_texts` on a world whose log holds bucket rows: the explored texts lead, the most explored first, then
    the draw by rows as without a bucket."""
    import shutil

    from querytune.schema import normalize_text
    from querytune.train.targets import early_texts

    world = tmp_path / "w"
    shutil.copytree(small_world_master, world, ignore=shutil.ignore_patterns("audit"))
    log = pd.read_parquet(world / "log.parquet")
    plain = early_texts(world, 50)
    seed = {normalize_text(json.loads(line)["text"]) for line in (world / "seed.jsonl").read_text().splitlines()}
    drawn = {normalize_text(r["text"]) for r in plain}
    early = log.loc[log["period"] == "early", "query"]
    tail = [t for t in dict.fromkeys(early) if normalize_text(t) not in seed | drawn]
    two = json.dumps([{"p": 0.5, "parse": {}}, {"p": 0.5, "parse": {"intent": "x"}}])
    one = json.dumps([{"p": 1.0, "parse": {}}])
    first_row = log.drop_duplicates("query").set_index("query")
    bucket = [(tail[0], two)] * 3 + [(tail[1], two)] * 2 + [(tail[3], two)] + [(tail[2], one)] * 2
    rows = first_row.loc[[q for q, _ in bucket]].reset_index()
    rows["policy"], rows["candidates"] = "explore", [c for _, c in bucket]
    rows["query_id"] = [f"{i}-t1" for i in rows["query_id"] + rows.index.astype(str)]
    log["policy"], log["candidates"] = "greedy", None
    pd.concat([log, rows]).to_parquet(world / "log.parquet")
    first = [r["text"] for r in early_texts(world, 50)]
    assert first[:2] == [tail[0], tail[3]], "explored texts first, most explored first, every other one"
    assert tail[1] not in first, "the others are left for the miner's confirmation sample"
    assert tail[2] not in first[:2], "a bucket text served its greedy parse alone was not explored"
    assert len(set(map(normalize_text, first))) == 50, "then the draw by rows, as without a bucket"
