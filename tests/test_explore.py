"""The exploration bucket: the hash that picks its requests, the proposal's probabilities, and the server with the
bucket on (answers drawn and logged, never cached) and off (every byte as without it)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from fastapi.testclient import TestClient

from querytune.edits import Edit
from querytune.schema_file import load_schema
from querytune.serving.cache import Entry, open_cache
from querytune.serving.explore import Explorer, canonical, known_words
from querytune.serving.serve import create_app
from querytune.serving.settings import Settings

SCHEMA = load_schema()
THAI = {"intent": "find_business", "slots": {"cuisine": "thai"}}


class Proposer:
    """At the edge: the miner's proposer reduced to fixed edits per text (the real one embeds n-grams)."""

    def __init__(self, edits: dict[str, list[Edit]]):
        self.edits = edits

    def propose(self, texts, greedy):
        return [self.edits.get(t, []) for t in texts]


EDITS = {
    "cheap thai": [
        Edit("what", "thai", "cuisine", "thai", "chinese"),
        Edit("add", "cheap", "price", None, "cheap"),
        Edit("what", "thai", "cuisine", "thai", "not a cuisine"),  # refused by the schema: never a candidate
        Edit("swap", "thai", "cuisine", "thai", "thai"),  # the greedy parse again: not a second candidate
    ]
}


def test_the_bucket_takes_its_share_the_same_query_and_hour_stay_in_it_and_a_salt_moves_it():
    explorer = Explorer(SCHEMA, 0.1)
    keys = [(f"query {i}", 3600.0 * (i % 50)) for i in range(20_000)]
    chosen = [explorer.chosen(q, t) for q, t in keys]
    assert abs(sum(chosen) / len(chosen) - 0.1) < 4 * (0.1 * 0.9 / len(chosen)) ** 0.5
    assert all(explorer.chosen(q, t + 3599) == c for (q, t), c in zip(keys[:2000], chosen))  # the same hour
    other = Explorer(SCHEMA, 0.1, salt="another")
    moved = sum(c != other.chosen(q, t) for (q, t), c in zip(keys, chosen))
    assert moved > 0.1 * len(keys), "another salt draws another bucket"
    assert not any(Explorer(SCHEMA, 0.0).chosen(q, t) for q, t in keys[:1000])


def test_the_proposal_sums_to_one_keeps_the_greedy_parse_first_and_only_valid_distinct_parses():
    explorer = Explorer(SCHEMA, 0.5, Proposer(EDITS), keep=0.5)
    candidates = explorer.proposal("cheap thai", THAI)
    assert candidates[0] == {"parse": THAI, "p": 0.5}
    assert sum(c["p"] for c in candidates) == pytest.approx(1.0)
    parses = [canonical(c["parse"]) for c in candidates]
    assert len(parses) == len(set(parses)) == 3, "the refused value and the greedy parse again are dropped"
    assert {c["p"] for c in candidates[1:]} == {0.25}
    assert explorer.proposal("dentist", {"intent": "find_business", "slots": {"category": "dentist"}}) == [
        {"parse": {"intent": "find_business", "slots": {"category": "dentist"}}, "p": 1.0}
    ], "no candidate edit: the greedy parse, with probability one"


def test_with_known_words_only_edits_on_a_word_the_labels_never_wrote_are_proposed():
    words = known_words(["cheap pizza", "thai food"])
    assert Explorer(SCHEMA, 0.5, Proposer(EDITS), known=words).proposal("cheap thai", THAI) == [
        {"parse": THAI, "p": 1.0}
    ], "both triggers are known words: the greedy parse, with probability one"
    edits = {
        "birria": [
            Edit("what", "birria", "cuisine", "thai", "mexican"),
            Edit("swap", "birria", "price", "cheap", "affordable"),
        ]
    }
    candidates = Explorer(SCHEMA, 0.5, Proposer(edits), known=words).proposal("birria", THAI)
    assert [c["parse"]["slots"] for c in candidates] == [{"cuisine": "thai"}, {"cuisine": "mexican"}]
    assert [c["p"] for c in candidates] == [0.5, 0.5], "a filter's other value is no drift candidate"
    assert len(Explorer(SCHEMA, 0.5, Proposer(EDITS)).proposal("cheap thai", THAI)) == 3, "no known words: every word"


def test_draws_follow_the_propensities_they_log():
    explorer = Explorer(SCHEMA, 1.0, Proposer(EDITS), keep=0.6)
    n = 6000
    draws = [explorer.draw("cheap thai", "cheap thai", THAI, 3600.0 * i) for i in range(n)]
    seen = Counter(canonical(d.parse) for d in draws)
    for c in draws[0].candidates:
        share = seen[canonical(c["parse"])] / n
        assert abs(share - c["p"]) < 4 * (c["p"] * (1 - c["p"]) / n) ** 0.5
    assert all(d.propensity == next(c["p"] for c in d.candidates if c["parse"] == d.parse) for d in draws)


class Backend:
    """At the edge: a model that answers "cheap thai" with the Thai parse."""

    name, model_version, schema_version = "fake", "m1", "s1"

    def parse(self, texts):
        class P:
            parse, valid, confidence, error = THAI, True, 0.9, None

        return [P() for _ in texts]


def app(tmp_path, share: float, store=None, **settings):
    explorer = Explorer(SCHEMA, share, Proposer(EDITS)) if share is not None else None
    s = Settings(explore_log=str(tmp_path / "explore.jsonl") if share else None, **settings)
    return create_app(Backend(), store, s, explorer=explorer)


def without_latency(body: dict) -> dict:
    rows = body.get("results", [body])
    return [{k: v for k, v in r.items() if k != "latency_ms"} for r in rows]


def test_with_the_bucket_off_every_answer_is_the_same_bytes(tmp_path):
    bodies = []
    for share in (None, 0.0):
        store = open_cache(f"sqlite:///{tmp_path}/cache-{share}.db")
        store.put_many([("cheap thai", Entry(THAI, True, 0.9, "m1"))], "s1")
        with TestClient(app(tmp_path, share, store)) as client:
            hit = client.get("/v1/parse", params={"q": "cheap thai"})
            again = client.get("/v1/parse", params={"q": "cheap thai"})  # the gate's hit path
            both = client.post("/v1/parse", json={"queries": ["cheap thai", "thai food"]})
            bodies.append([without_latency(r.json()) for r in (hit, again, both)])
        assert client.app.app.state.service.explorer is None
    assert bodies[0] == bodies[1]
    assert "policy" not in json.dumps(bodies[1])
    assert not (tmp_path / "explore.jsonl").exists()


def test_bucket_answers_carry_their_probabilities_are_logged_and_never_cached(tmp_path):
    store = open_cache(f"sqlite:///{tmp_path}/cache.db")
    store.put_many([("cheap thai", Entry(THAI, True, 0.9, "m1"))], "s1")
    explorer = Explorer(SCHEMA, 1.0, Proposer(EDITS), bucket_s=1)  # a new draw every second
    settings = Settings(explore_log=str(tmp_path / "explore.jsonl"))
    answers = []
    with TestClient(create_app(Backend(), store, settings, explorer=explorer)) as client:
        service = client.app.app.state.service
        for at in range(40):  # the service's own times, not the wall clock: one request per time bucket
            rows, status = client.portal.call(service.answer, ["cheap thai", "thai food"], None, float(at))
            assert status == 200
            answers += rows
        for _ in range(3):  # through HTTP, hit path included
            body = client.get("/v1/parse", params={"q": "cheap thai"}).json()
            assert body["policy"] == "explore" and body["source"] == "cache"
    served = Counter(canonical(r["parse"]) for r in answers if r["query"] == "cheap thai")
    assert len(served) == 3, "every candidate gets served"
    for r in answers:
        assert r["policy"] == "explore"
        assert sum(c["p"] for c in r["candidates"]) == pytest.approx(1.0)
        assert r["propensity"] == next(c["p"] for c in r["candidates"] if c["parse"] == r["parse"])
    logged = [json.loads(line) for line in (tmp_path / "explore.jsonl").read_text().splitlines()]
    assert len(logged) == len(answers) + 3
    assert {canonical(r["parse"]) for r in logged} == set(served) | {canonical(THAI)}
    # the store and the in-process copy only ever hold the greedy parse
    assert store.get_many(["cheap thai", "thai food"], "s1", "m1")[0].parse == THAI
    assert all(e.parse == THAI for e in service.cache.local.items.values())


def test_serve_refuses_a_bucket_without_an_index(tmp_path):
    from typer.testing import CliRunner

    from querytune.cli import app as cli

    result = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path), "--explore-share", "0.1"])
    assert result.exit_code == 2
    assert "--explore-share needs --explore-index" in result.output


@pytest.mark.slow
def test_a_server_killed_mid_traffic_has_logged_every_exploratory_answer_it_sent(
    tiny_model, real_index, small_world_master, tmp_path
):
    """The real server with the whole traffic in the bucket, killed with SIGKILL right after its last answer."""
    import os
    import signal

    import httpx

    from querytune.testing import start_server

    texts = [json.loads(line)["text"] for line in (small_world_master / "test.jsonl").read_text().splitlines()][:40]
    log = tmp_path / "explore.jsonl"
    proc, base = start_server(
        ["--model", str(tiny_model), "--cache", f"sqlite:///{tmp_path}/cache.db", "--workers", "1",
         "--deadline", "60", "--explore-share", "1", "--explore-index", str(real_index),
         "--explore-seed", str(small_world_master / "seed.jsonl"), "--explore-log", str(log)],
        tmp_path / "server.log",
    )  # fmt: skip
    try:
        answers = [httpx.get(f"{base}/v1/parse", params={"q": q}, timeout=60).json() for q in texts]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    explored = [a for a in answers if a.get("policy") == "explore"]
    assert len(explored) >= 10, (tmp_path / "server.log").read_text()
    logged = Counter((r["query"], canonical(r["parse"])) for r in map(json.loads, log.read_text().splitlines()))
    sent = Counter((a["query"], canonical(a["parse"])) for a in explored)
    assert sent <= logged, "an answer the user saw is missing from the explore log"
    assert any(len(a["candidates"]) > 1 for a in explored), "some request was served from a real proposal"
