"""Serving: cache hits (through the gate's hit path and through the app), micro-batched misses and misses sent to a
batching engine, written back; deadlines, limits, Redis down and model down; `--workers`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from querytune.serving.asgi_gate import AccessLog
from querytune.serving.cache import Entry, RedisCache, open_cache
from querytune.serving.serve import create_app
from querytune.serving.service import Tally
from querytune.serving.settings import Settings
from querytune.testing import free_port, start_server


class FakePrediction:
    def __init__(self, text):
        self.parse, self.valid, self.confidence, self.error = (
            {"intent": "find_business", "slots": {"category": text.split()[0]}},
            True,
            0.8,
            None,
        )


class SlowBackend:
    """At the edge of the tests: a backend that takes `delay` seconds per call and records its batches."""

    name, model_version, schema_version = "fake", "m1", "s1"

    def __init__(self, delay=0.05, fail=False):
        self.delay, self.fail, self.batches = delay, fail, []

    def parse(self, texts):
        if self.fail:
            raise ConnectionError("vLLM server at 127.0.0.1:8001 refused the connection")
        time.sleep(self.delay)
        self.batches.append(list(texts))
        return [FakePrediction(t) for t in texts]


class AsyncBackend:
    """At the edge: an engine that batches concurrent calls itself (`aparse`, as vLLM's async engine), counting the
    calls in flight at once. It has no `parse`: the batcher never calls it."""

    name, model_version, schema_version = "fake-async", "m1", "s1"

    def __init__(self, delay=0.2, fail=False):
        self.delay, self.fail, self.calls, self.in_flight, self.most_in_flight = delay, fail, [], 0, 0

    async def aparse(self, texts):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.fail:
                raise ConnectionError("vLLM engine is dead")
            self.calls.append(list(texts))
            return [FakePrediction(t) for t in texts]
        finally:
            self.in_flight -= 1


THAI = Entry({"intent": "find_business", "slots": {"cuisine": "thai"}}, True, 0.9, "m1")


def access_log(tmp_path: Path) -> tuple[AccessLog, Path]:
    """An access log into a file of the test's own (the lines are there once the app has shut down)."""
    path = tmp_path / "access.log"
    return AccessLog(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)), path


def warmed(client: TestClient) -> TestClient:
    """`client` once /healthz says ready (the server's warm-up parse has ended), as a load balancer waits."""
    for _ in range(500):
        if client.get("/healthz").status_code == 200:
            return client
        time.sleep(0.02)
    raise AssertionError("/healthz still warming after 10 s")


@pytest.fixture()
def sqlite_cache(tmp_path):
    return open_cache(f"sqlite:///{tmp_path}/cache.db")


def test_hit_miss_and_write_back(sqlite_cache):
    sqlite_cache.put_many(
        [("cheap thai", Entry({"intent": "find_business", "slots": {"cuisine": "thai"}}, True, 0.9, "m1"))], "s1"
    )
    backend = SlowBackend()
    with TestClient(create_app(backend, sqlite_cache)) as client:
        hit = client.get("/v1/parse", params={"q": "  Cheap THAI "}).json()
        assert (
            hit["source"] == "cache"
            and hit["parse"]["slots"] == {"cuisine": "thai"}
            and hit["normalized"] == "cheap thai"
        )
        assert hit["model_version"] == "m1" and hit["latency_ms"] >= 0
        miss = client.get("/v1/parse", params={"q": "plumber austin"}).json()
        assert miss["source"] == "model" and miss["parse"]["slots"] == {"category": "plumber"}
        again = client.get("/v1/parse", params={"q": "Plumber Austin"}).json()
        assert again["source"] == "cache", "a model answer is written back"
        body = client.post("/v1/parse", json={"queries": ["cheap thai", "dentist", "dentist", "barber"]}).json()
        assert [r["source"] for r in body["results"]] == ["cache", "model", "model", "model"]
        assert backend.batches[-1] == ["dentist", "barber"], "one backend call, each distinct miss once"
        metrics = client.get("/metrics").text
        assert (
            'querytune_answers_total{source="cache"} 3.0' in metrics and "querytune_miss_batch_size_bucket" in metrics
        )
        health = client.get("/healthz").json()
        assert {k: health[k] for k in ("status", "model_version", "schema_version", "backend")} == {
            "status": "ok",
            "model_version": "m1",
            "schema_version": "s1",
            "backend": "fake",
        }
        assert health["cache"]["state"] == "ok" and health["cache"]["local_entries"] >= 1
        assert client.get("/openapi.json").status_code == 200


def test_healthz_says_warming_until_the_model_has_answered_its_warm_up_parse(sqlite_cache):
    cold = threading.Event()

    class ColdBackend(SlowBackend):  # its first call waits, as a real model's compiles its grammar
        def parse(self, texts):
            cold.wait(10)
            return super().parse(texts)

    backend = ColdBackend(delay=0.0)
    with TestClient(create_app(backend, sqlite_cache)) as client:
        health = client.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "warming", "not ready before the warm-up"
        assert health.json()["model_version"] == "m1"
        cold.set()
        assert warmed(client).get("/healthz").json()["status"] == "ok"
        assert backend.batches == [["warm-up query"]], "the server warmed the model at start, once"
        assert client.get("/v1/parse", params={"q": "warm-up query"}).json()["source"] == "model", "not cached"
        metrics = client.get("/metrics").text
        assert 'querytune_answers_total{source="model"} 1.0' in metrics, "not counted: only the query after it"
        assert "querytune_miss_batch_size_count 1.0" in metrics


def test_each_row_of_a_batch_carries_its_own_latency(sqlite_cache):
    sqlite_cache.put_many([("cheap thai", THAI)], "s1")
    with TestClient(create_app(SlowBackend(delay=0.3), sqlite_cache)) as client:
        hit, miss = client.post("/v1/parse", json={"queries": ["cheap thai", "dentist"]}).json()["results"]
    assert (hit["source"], miss["source"]) == ("cache", "model")
    assert miss["latency_ms"] >= 300 and hit["latency_ms"] < miss["latency_ms"] - 200, (
        "a hit's time is its lookup, not the miss's model call beside it"
    )


def get_at_once(client, queries: list[str]) -> list[dict]:
    """`GET /v1/parse` for every query, each from its own thread, all in flight together."""
    out = []
    threads = [
        threading.Thread(target=lambda q=q: out.append(client.get("/v1/parse", params={"q": q}).json()))
        for q in queries
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_misses_share_one_backend_call(sqlite_cache):
    backend = SlowBackend(delay=0.3)
    app = create_app(backend, sqlite_cache, Settings(batch_window_ms=50))
    with TestClient(app) as client:
        out = get_at_once(client, [f"query {i}" for i in range(8)])
    assert all(r["source"] == "model" for r in out) and len(out) == 8
    assert len(backend.batches) < 8 and max(len(b) for b in backend.batches) > 1


def test_a_miss_past_its_deadline_falls_back_and_is_queued(sqlite_cache, tmp_path):
    log = tmp_path / "fallback.jsonl"
    with TestClient(
        create_app(SlowBackend(delay=1.0), sqlite_cache, Settings(deadline=0.1, fallback_log=str(log)))
    ) as client:
        warmed(client)  # the warm-up parse holds the slow model for its first second
        r = client.get("/v1/parse", params={"q": "slow query"}).json()
        time.sleep(1.2)
        late = client.get("/v1/parse", params={"q": "slow query"}).json()
    assert r["source"] == "fallback" and r["parse"] is None and "search the raw text" in r["error"]
    assert late["source"] == "cache", "the model's late answer is still written back"
    assert '"slow query"' in log.read_text()


def test_limits_are_answered_with_4xx_and_a_reason(sqlite_cache):
    app = create_app(
        SlowBackend(), sqlite_cache, Settings(max_query_chars=20, max_batch=3, max_body_bytes=300, api_key="k")
    )
    with TestClient(app) as client:
        assert client.get("/v1/parse", params={"q": "x"}).status_code == 401
        h = {"X-API-Key": "k"}
        r = client.get("/v1/parse", params={"q": "y" * 30}, headers=h)
        assert r.status_code == 400 and "longer than 20 characters" in r.json()["error"]
        r = client.post("/v1/parse", json={"queries": ["a", "b", "c", "d"]}, headers=h)
        assert r.status_code == 413 and "at most 3" in r.json()["error"]
        r = client.post("/v1/parse", json={"queries": ["a" * 10] * 3 + ["b" * 300]}, headers=h)
        assert r.status_code == 413 and "request body" in r.json()["error"]
        assert client.get("/v1/parse", params={"q": "   "}, headers=h).status_code == 400
        assert client.get("/v1/parse", params={"q": "ok"}, headers={"Authorization": "Bearer k"}).status_code == 200
        assert client.get("/healthz").status_code == 200, "health checks need no key"


def test_model_down_hits_answer_misses_get_503(sqlite_cache):
    sqlite_cache.put_many([("pizza", Entry({"intent": "find_business", "slots": {}}, True, 0.9, "m1"))], "s1")
    with TestClient(create_app(SlowBackend(fail=True), sqlite_cache)) as client:
        assert client.get("/v1/parse", params={"q": "pizza"}).json()["source"] == "cache"
        r = client.get("/v1/parse", params={"q": "sushi"})
        assert r.status_code == 503 and "refused the connection" in r.json()["error"]
        r = client.post("/v1/parse", json={"queries": ["pizza", "sushi"]})
        assert r.status_code == 503 and [x["source"] for x in r.json()["results"]] == ["cache", "unavailable"]


@pytest.fixture()
def redis_server(tmp_path):
    """A real redis-server on loopback (installed by .ci/run), stopped after the test."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            RedisCache(url).client.ping()
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.05)
    yield proc, url
    proc.kill()
    proc.wait()


def test_redis_cache_and_redis_down_keeps_answering(redis_server):
    proc, url = redis_server
    cache = open_cache(url)
    cache.put_many(
        [("pizza", Entry({"intent": "find_business", "slots": {"cuisine": "pizza"}}, True, 0.9, "m1"))], "s1"
    )
    assert cache.stats()["entries"] == 1
    backend = SlowBackend()
    with TestClient(create_app(backend, cache)) as client:
        assert client.get("/v1/parse", params={"q": "pizza"}).json()["source"] == "cache"
        assert client.get("/v1/parse", params={"q": "sushi"}).json()["source"] == "model"
        assert client.get("/v1/parse", params={"q": "sushi"}).json()["source"] == "cache"
        proc.kill()
        proc.wait()
        down = [client.get("/v1/parse", params={"q": q}) for q in ("pizza", "sushi", "ramen")]
        assert [r.status_code for r in down] == [200, 200, 200]
        assert [r.json()["source"] for r in down] == ["cache", "cache", "model"], (
            "hot entries answer from the in-process copy"
        )
        health = client.get("/healthz").json()
        assert (
            health["status"] == "degraded"
            and health["cache"]["state"] == "degraded"
            and "ConnectionError" in health["cache"]["last_error"]
        )
        assert 'querytune_cache_errors_total{kind="read"}' in client.get("/metrics").text


def test_cache_cli_load_warm_promote_rollback(tiny_model, small_world_master, tmp_path):
    """label -> cache load -> stats; warm the head of a log with a model, promote it, roll back; `--model active`."""
    import json as _json

    import pandas as pd
    from typer.testing import CliRunner

    from querytune.cli import app
    from querytune.runtime.model import ModelFolder
    from querytune.serving.serve import resolve_model

    log = pd.read_parquet(small_world_master / "log.parquet", columns=["query", "period"]).head(300)
    log.to_parquet(tmp_path / "log.parquet")
    url = f"sqlite:///{tmp_path}/cache.db"
    run = CliRunner().invoke
    r = run(
        app,
        [
            "label",
            str(tmp_path / "log.parquet"),
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path / "labels"),
            "--where",
            "period=early",
        ],
    )
    assert r.exit_code == 0, r.output
    labeled = _json.loads(r.stdout.strip().splitlines()[-1])
    assert labeled["rows"] == int((log["period"] == "early").sum())
    r = run(app, ["cache", "load", str(tmp_path / "labels"), "--cache", url])
    assert r.exit_code == 0, r.output
    loaded = _json.loads(r.stdout)
    assert loaded["loaded"] + loaded["skipped_invalid"] == labeled["distinct"]
    stats = _json.loads(run(app, ["cache", "stats", "--cache", url]).stdout)
    assert stats["entries"] == loaded["loaded"] and stats["active"] is None

    r = run(app, ["cache", "rollback", "--cache", url])
    assert r.exit_code == 2 and "nothing to roll back to" in r.output
    r = run(
        app,
        [
            "cache",
            "warm",
            str(tmp_path / "log.parquet"),
            "--model",
            str(tiny_model),
            "--cache",
            url,
            "--top",
            "20",
            "--work",
            str(tmp_path / "warm"),
        ],
    )
    assert r.exit_code == 0, r.output
    warmed = _json.loads(r.stdout)
    assert warmed["head_queries"] == 20 and warmed["model_version"] == ModelFolder.open(tiny_model).version
    r = run(app, ["cache", "promote", "--model", str(tiny_model), "--cache", url])
    assert r.exit_code == 0, r.output
    assert resolve_model("active", open_cache(url)) == tiny_model.resolve()
    run(app, ["cache", "promote", "--model", str(tiny_model), "--cache", url])
    r = run(app, ["cache", "rollback", "--cache", url])
    assert r.exit_code == 0 and _json.loads(r.stdout)["model_dir"] == str(tiny_model.resolve())
    r = run(app, ["cache", "stats", "--cache", "redis://127.0.0.1:1/0"])
    assert r.exit_code == 2 and "127.0.0.1:1" in r.output


def answered(r: httpx.Response) -> tuple:
    """What a client sees of an answer, but its latency (and so its length)."""
    body = r.json()
    assert int(r.headers["content-length"]) == len(r.content)
    return r.status_code, [h for h in r.headers.multi_items() if h[0] != "content-length"], body | {"latency_ms": None}


def test_a_hit_through_the_gate_is_the_apps_answer_counted_and_logged_the_same(sqlite_cache, tmp_path):
    queries = ["cheap thai", "  Cheap THAI ", "café crème", "4+ stars thai"]  # spaces, case, UTF-8, a plus sign
    sqlite_cache.put_many([(q, THAI) for q in ("cheap thai", "café crème", "4+ stars thai")], "s1")
    access, log = access_log(tmp_path)
    gate = create_app(SlowBackend(), sqlite_cache, Settings(api_key="k"), access=access)
    reached = []
    app = gate.app

    async def behind_the_gate(scope, receive, send):  # the FastAPI app, recording what reaches it
        if scope["type"] == "http":
            reached.append(scope["path"])
        await app(scope, receive, send)

    with TestClient(gate) as client:

        def get(q, auth=("X-API-Key", "k")):
            return client.get("/v1/parse", params={"q": q}, headers={auth[0]: auth[1], "X-Request-ID": "trace-1"})

        cold = [get(q) for q in queries]  # the store answers through the app; the in-process copy keeps each
        gate.app = behind_the_gate
        warm = [get(q) for q in queries]
        assert reached == [], "hits of the in-process copy never enter FastAPI"
        bearer = get("cheap thai", ("Authorization", "Bearer k"))
        raw = client.get("/v1/parse?q=cheap%20thai", headers={"X-API-Key": "k", "X-Request-ID": "trace-1"})
        assert reached == []
        miss = get("plumber austin")
        assert reached == ["/v1/parse"] and miss.json()["source"] == "model", "a miss goes on to the app"
        assert [answered(r) for r in warm] == [answered(r) for r in cold]
        assert answered(bearer) == answered(raw) == answered(cold[0])
        assert [r.json()["query"] for r in warm] == queries and warm[1].json()["normalized"] == "cheap thai"
        assert cold[0].headers["content-type"] == "application/json" and cold[0].headers["x-request-id"] == "trace-1"
        hits = len(cold) + len(warm) + 2
        metrics = client.get("/metrics").text
    assert f'querytune_answers_total{{source="cache"}} {hits}.0' in metrics
    assert f'querytune_request_seconds_count{{endpoint="get"}} {hits + 1}.0' in metrics
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(x["path"], x["status"], x["request_id"]) for x in lines[: hits + 1]] == [("/v1/parse", 200, "trace-1")] * (
        hits + 1
    )
    assert len(lines) == hits + 2 and lines[-1]["path"] == "/metrics", "one line per request, on both paths"


def test_a_promotion_ends_the_gates_answers_from_the_old_model(sqlite_cache):
    """The gate keeps a hot query's body; once another model is served, that body is not answered again."""
    sqlite_cache.put_many([("cheap thai", THAI)], "s1")
    gate = create_app(SlowBackend(delay=0.0), sqlite_cache, Settings())
    service = gate.app.state.service
    scope = {"method": "GET", "path": "/v1/parse", "query_string": b"q=cheap+thai"}
    with TestClient(gate) as client:
        hit = lambda: client.portal.call(service.hit, scope, {})  # noqa: E731 - on the app's event loop, as the gate calls it
        assert hit() is None, "not yet in the in-process copy"
        assert client.get("/v1/parse", params={"q": "cheap thai"}).json()["source"] == "cache"  # through the store
        body = json.loads(hit())
        assert body["source"] == "cache" and body["model_version"] == "m1" and 0 <= body["latency_ms"] < 10
        new = SlowBackend(delay=0.0)
        new.model_version = "m2"
        service.swap(new)
        assert hit() is None
        answer = client.get("/v1/parse", params={"q": "cheap thai"}).json()
        assert (answer["source"], answer["model_version"]) == ("model", "m2")


def test_a_tally_adds_up_to_what_observing_each_value_writes():
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    def metrics():
        reg = CollectorRegistry()
        return (
            reg,
            Counter("answers", "a", registry=reg),
            Histogram("seconds", "s", registry=reg, buckets=(0.001, 0.01, 0.1)),
        )

    def written(reg) -> list[str]:  # but the times each metric was created
        return [line for line in generate_latest(reg).decode().splitlines() if "_created" not in line]

    values = [0.0005, 0.001, 0.002, 0.01, 0.05, 0.2, 3.0, 0.0]
    each, tallied = metrics(), metrics()
    for v in values:
        each[1].inc()
        each[2].observe(v)

    async def add_all():
        tally = Tally(tallied[1], tallied[2], every_s=60)
        for v in values:
            tally.add(v)
        assert written(tallied[0]) != written(each[0]), "nothing is written before the flush"
        tally.flush()

    asyncio.run(add_all())
    assert written(tallied[0]) == written(each[0])


def test_a_missing_or_wrong_key_gets_the_apps_401_though_the_query_is_hot(sqlite_cache):
    sqlite_cache.put_many([("cheap thai", THAI)], "s1")
    gate = create_app(SlowBackend(), sqlite_cache, Settings(api_key="k"))
    cold_gate = create_app(SlowBackend(), None, Settings(api_key="k"))
    refused = [{}, {"X-API-Key": "j"}, {"Authorization": "Bearer j"}, {"Authorization": "Basic k"}, {"X-API-Key": ""}]
    with TestClient(gate) as client, TestClient(cold_gate) as cold_client:
        assert (
            client.get("/v1/parse", params={"q": "cheap thai"}, headers={"X-API-Key": "k"}).json()["source"] == "cache"
        )
        for headers in refused:
            hot = client.get("/v1/parse", params={"q": "cheap thai"}, headers=headers | {"X-Request-ID": "r"})
            cold = cold_client.get("/v1/parse", params={"q": "cheap thai"}, headers=headers | {"X-Request-ID": "r"})
            assert hot.status_code == 401 and hot.content == cold.content
            assert hot.json() == {
                "error": "missing or wrong API key (send X-API-Key or Authorization: Bearer)",
                "code": "auth",
                "request_id": "r",
            }
        assert 'querytune_errors_total{reason="auth"} 5.0' in client.get("/metrics").text


def test_misses_go_straight_to_a_backend_that_batches_them_itself(sqlite_cache):
    backend = AsyncBackend(delay=0.3)
    with TestClient(create_app(backend, sqlite_cache, Settings(batch_window_ms=0))) as client:
        out = get_at_once(client, [f"query {i}" for i in range(8)])
        assert sorted(r["source"] for r in out) == ["model"] * 8
        assert backend.most_in_flight > 1 and all(len(c) == 1 for c in backend.calls), (
            "one call per miss, several in flight at once"
        )
        assert client.get("/v1/parse", params={"q": "query 3"}).json()["source"] == "cache", "answers are written back"
        assert "querytune_miss_batch_size_count 8.0" in client.get("/metrics").text


def test_a_batching_backend_past_the_deadline_or_down(sqlite_cache, tmp_path):
    with TestClient(create_app(AsyncBackend(delay=0.5), sqlite_cache, Settings(deadline=0.1))) as client:
        r = client.get("/v1/parse", params={"q": "slow query"}).json()
        time.sleep(0.6)
        late = client.get("/v1/parse", params={"q": "slow query"}).json()
    assert r["source"] == "fallback" and late["source"] == "cache", "the late answer is still written back"
    with TestClient(create_app(AsyncBackend(delay=0.0, fail=True), sqlite_cache)) as client:
        r = client.get("/v1/parse", params={"q": "sushi"})
    assert r.status_code == 503 and "vLLM engine is dead" in r.json()["error"]


def test_serve_help_documents_workers():
    from typer.testing import CliRunner

    from querytune.cli import app

    r = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "--workers" in r.output and "QUERYTUNE_WORKERS" in r.output


def test_serve_help_at_80_columns_shows_every_option_and_variable_whole():
    from typer.main import get_command
    from typer.testing import CliRunner

    from querytune.cli import app

    r = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "80"})
    assert r.exit_code == 0 and max(map(len, r.output.splitlines())) <= 80
    words = set(re.findall(r"[\w-]+", r.output))
    params = get_command(app).commands["serve"].params
    names = [n for p in params for n in p.opts + p.secondary_opts] + [p.envvar for p in params if p.envvar]
    assert len(names) > 40 and not [n for n in names if n not in words], (
        "each name whole, none cut to `--local-cache-en…`"
    )


def test_two_workers_each_with_its_model_answer_and_log_every_request(tiny_model, tmp_path):
    url = f"sqlite:///{tmp_path}/cache.db"
    open_cache(url).put_many([("cheap thai", THAI)], "s1")
    proc, base = start_server(
        ["--model", str(tiny_model), "--cache", url, "--workers", "2", "--deadline", "60"], tmp_path / "server.log"
    )
    try:
        answers = [
            httpx.get(f"{base}/v1/parse", params={"q": q}, timeout=60)
            for q in ("pizza", "cheap thai", "pizza", "dentist")
        ]
        time.sleep(0.6)  # a worker adds its hits to the shared metrics every half second (`Tally`)
        scrapes = [httpx.get(f"{base}/metrics").text for _ in range(4)]
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert [r.status_code for r in answers] == [200] * 4 and answers[0].json()["source"] == "model"
    log = (tmp_path / "server.log").read_text()
    assert len(set(re.findall(r"worker (\d+): model", log))) == 2, log
    for text in scrapes:  # whichever worker takes the scrape, it counts both workers' answers
        assert (
            sum(float(n) for n in re.findall(r'^querytune_answers_total{source="\w+"} ([\d.]+)$', text, re.MULTILINE))
            == 4
        ), text
    assert sum(line.startswith('{"ts"') for line in log.splitlines()) >= 5, (
        "the access lines of both workers reach the log"
    )
