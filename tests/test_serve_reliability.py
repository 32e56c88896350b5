"""Serving that survives its cache and its input: store write errors, a locked SQLite, a hung Redis, inputs JSON cannot
carry back, chunked bodies, one error format, promotions followed without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time

import pytest
from fastapi.testclient import TestClient
from test_serve import AsyncBackend, SlowBackend, access_log, redis_server  # noqa: F401 - the fixture

from querytune.serving.cache import CacheUnavailable, Entry, open_cache
from querytune.serving.serve import create_app
from querytune.serving.service import PromotionWatcher
from querytune.serving.serving_cache import Breaker, ServingCache
from querytune.serving.settings import Settings

HIT = Entry({"intent": "find_business", "slots": {"cuisine": "thai"}}, True, 0.9, "m1")


class RefusingStore:
    """At the edge: a store whose reads work and whose writes are refused, as Redis answers NOREPLICAS / READONLY."""

    url = "fake://refusing"

    def __init__(self):
        self.entries, self.writes = {}, 0

    def get_many(self, queries, schema_version, model_version):
        return [self.entries.get(q) for q in queries]

    def put_many(self, items, schema_version):
        self.writes += 1
        raise CacheUnavailable("fake://refusing: ResponseError: NOREPLICAS Not enough good replicas to write.")

    def active(self):
        return None


def test_a_refused_write_back_never_stops_model_answers():
    store = RefusingStore()
    with TestClient(create_app(SlowBackend(delay=0.0), store)) as client:
        sources = [client.get("/v1/parse", params={"q": f"plumber {i}"}).json()["source"] for i in range(8)]
        assert sources == ["model"] * 8, "every miss after the first refused write is still answered by the model"
        health = client.get("/healthz").json()
        assert health["status"] == "degraded" and "NOREPLICAS" in health["cache"]["last_error"]
        assert health["cache"]["writes"] == "open" and store.writes == 3, (
            "the breaker stops writing to a store that refuses"
        )
        assert 'querytune_cache_errors_total{kind="write"}' in client.get("/metrics").text
        assert client.get("/v1/parse", params={"q": "plumber 3"}).json()["source"] == "cache", (
            "the in-process copy kept it"
        )


def test_a_locked_sqlite_neither_blocks_the_loop_nor_stops_misses(tmp_path):
    url = f"sqlite:///{tmp_path}/cache.db"
    open_cache(url)
    locker = sqlite3.connect(tmp_path / "cache.db", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # what `cache warm` holds while it writes
    try:
        store = open_cache(url, busy_timeout_s=0.05)
        with TestClient(create_app(SlowBackend(delay=0.0), store)) as client:
            t0 = time.perf_counter()
            sources = [client.get("/v1/parse", params={"q": f"dentist {i}"}).json()["source"] for i in range(5)]
            assert sources == ["model"] * 5 and time.perf_counter() - t0 < 5
            time.sleep(0.3)
            assert client.get("/healthz").json()["status"] == "degraded"
    finally:
        locker.execute("ROLLBACK")


def test_a_hung_redis_costs_a_request_at_most_the_lookup_budget(redis_server):  # noqa: F811
    proc, url = redis_server
    store = open_cache(url)
    store.put_many([("cheap thai", HIT)], "s1")
    with TestClient(create_app(SlowBackend(delay=0.0), store, Settings(lookup_timeout=0.1))) as client:
        assert client.get("/v1/parse", params={"q": "cheap thai"}).json()["source"] == "cache"
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            answers = [
                client.get("/v1/parse", params={"q": q}).json()["source"]
                for q in ["cheap thai", "sushi", "ramen", "cheap thai"]
            ]
            assert answers == ["cache", "model", "model", "cache"] and time.perf_counter() - t0 < 2
            assert client.get("/healthz").json()["cache"]["reads"] == "open"
        finally:
            os.kill(proc.pid, signal.SIGCONT)


def test_the_breaker_opens_then_tries_again():
    now = [0.0]
    b = Breaker(failures_to_open=2, open_s=5, clock=lambda: now[0])
    b.fail()
    assert b.allow()
    b.fail()
    assert not b.allow() and b.state == "open"
    now[0] = 5.1
    assert b.allow() and not b.allow(), "one trial call after the pause, the others still skip"
    b.ok()
    assert b.allow() and b.state == "closed"


def test_the_local_copy_is_bounded_and_keeps_the_most_recent():
    cache = ServingCache(None, "s1", local_entries=2)

    async def go():
        cache.write_back([("a", HIT), ("b", HIT)])
        await cache.get_many(["a"], "m1")  # touch a: b is now the oldest
        cache.write_back([("c", HIT)])
        return await cache.get_many(["a", "b", "c"], "m1")

    assert [e is not None for e in asyncio.run(go())] == [True, False, True]


@pytest.mark.parametrize(
    "body",
    [
        '{"queries": ["\\ud800"]}',
        '{"queries": [1e999]}',
        '{"queries": [NaN]}',
        '{"queries": "x"}',
        '{"queries": [["a"]]}',
        '{"queries": ["a"',
        "[1, 2]",
        '{"queries": [' + "9" * 5000 + "]}",
    ],
)
def test_inputs_json_cannot_carry_back_get_400_not_500(body):
    with TestClient(create_app(SlowBackend(delay=0.0), None), raise_server_exceptions=False) as client:
        r = client.post("/v1/parse", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error", "code", "request_id"} and r.json()["code"] == "bad_query"


def test_a_lone_surrogate_in_get_is_400():
    with TestClient(create_app(SlowBackend(delay=0.0), None), raise_server_exceptions=False) as client:
        for q in ("caf%ED%A0%80", "caf%E9", "%C0%AF"):  # a lone surrogate and bytes that are not UTF-8
            r = client.get(f"/v1/parse?q={q}")
            assert r.status_code in (200, 400) and r.json()["source" if r.status_code == 200 else "code"] in (
                "model",
                "bad_query",
            )


def test_a_chunked_body_cannot_skip_the_size_limit():
    chunks = (b'{"queries": ["' + b"a" * 1000 for _ in range(300))  # no Content-Length: sent chunked
    with TestClient(create_app(SlowBackend(delay=0.0), None, Settings(max_body_bytes=4096))) as client:
        r = client.post("/v1/parse", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "body"


def test_every_error_has_one_body_format_and_a_request_id(tmp_path):
    access, log = access_log(tmp_path)
    app = create_app(SlowBackend(fail=True), None, Settings(api_key="k", max_batch=2), access=access)
    with TestClient(app) as client:
        h = {"X-API-Key": "k"}
        cases = [
            client.get("/v1/parse", params={"q": "x"}),
            client.get("/v1/parse", params={"q": "x"}, headers={"X-API-Key": "j"}),
            client.get("/v1/parse", params={"q": " "}, headers=h),
            client.get("/nowhere"),
            client.delete("/v1/parse", headers=h),
            client.post("/v1/parse", json={"queries": ["a", "b", "c"]}, headers=h),
            client.get("/v1/parse", params={"q": "sushi"}, headers=h),
            client.get("/v1/parse", headers=h),
        ]
        mine = client.get("/v1/parse", params={"q": "x"}, headers={"X-Request-ID": "trace-42"})
    assert [r.status_code for r in cases] == [401, 401, 400, 404, 405, 413, 503, 400]
    for r in cases:
        body = r.json()
        assert {"error", "code", "request_id"} <= set(body) and body["request_id"] == r.headers["x-request-id"]
    assert mine.json()["request_id"] == "trace-42"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == len(cases) + 1 and lines[-1]["request_id"] == "trace-42" and lines[-1]["status"] == 401


def test_openapi_documents_results_errors_and_the_key_and_docs_load_offline():
    with TestClient(create_app(SlowBackend(), None, Settings(api_key="k"))) as client:
        spec = client.get("/openapi.json").json()
        docs = client.get("/docs").text
        asset = client.get(docs.split("swagger-ui-bundle.js")[0].rsplit('"', 1)[1] + "swagger-ui-bundle.js")
    post = spec["paths"]["/v1/parse"]["post"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/BatchResult"
    }
    for code in ("400", "401", "413", "503"):
        assert post["responses"][code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"
        }
    assert {"APIKeyHeader", "HTTPBearer"} <= set(spec["components"]["securitySchemes"])
    assert "cdn" not in docs.lower() and asset.status_code == 200 and len(asset.content) > 100_000


def test_openapi_lists_only_the_statuses_the_api_sends():
    with TestClient(create_app(SlowBackend(delay=0.0), None, Settings(api_key="k"))) as client:
        spec = client.get("/openapi.json").json()
        malformed = client.post("/v1/parse", json={"queries": "not a list"}, headers={"X-API-Key": "k"})
    codes = {(path, method): set(op["responses"]) for path, ops in spec["paths"].items() for method, op in ops.items()}
    assert codes[("/v1/parse", "get")] == {"200", "400", "401", "408", "503"}
    assert codes[("/v1/parse", "post")] == {"200", "400", "401", "408", "413", "503"}
    assert codes[("/healthz", "get")] == {"200", "503"} and codes[("/metrics", "get")] == {"200"}
    assert not {"HTTPValidationError", "ValidationError"} & set(spec["components"]["schemas"])
    assert malformed.status_code == 400 and malformed.json()["code"] == "bad_query", "what FastAPI would answer 422"


class Promotions:
    """At the edge: a store that only answers the promotion record."""

    def __init__(self):
        self.record = None

    def active(self):
        return self.record

    def get_many(self, queries, schema_version, model_version):
        return [None] * len(queries)

    def put_many(self, items, schema_version):
        return 0


def test_replicas_follow_a_promotion_and_a_rollback_without_a_restart():
    store, old = Promotions(), SlowBackend(delay=0.0)
    loaded = {}

    def load(path):
        if path.name == "broken":
            raise OSError("no weights")
        b = SlowBackend(delay=0.0)
        b.model_version = loaded[path.name] = f"v-{path.name}"
        return b

    store.record = {"model_dir": "/models/a"}
    watchers = []
    app = create_app(
        old,
        store,
        watch=lambda service: watchers.append(PromotionWatcher(service, store, load, 3600, "/models/a")) or watchers[0],
    )
    with TestClient(app) as client:
        assert client.get("/healthz").json()["model_version"] == "m1"
        check = watchers[0].check
        store.record = {"model_dir": "/models/b"}
        assert client.portal.call(check) is True
        assert client.get("/healthz").json()["model_version"] == "v-b"
        assert client.get("/v1/parse", params={"q": "pizza"}).json()["model_version"] == "v-b"
        store.record = {"model_dir": "/models/broken"}
        assert client.portal.call(check) is False and client.get("/healthz").json()["model_version"] == "v-b", (
            "a bad promotion is not served"
        )
        store.record = {"model_dir": "/models/a"}
        assert client.portal.call(check) is True and client.get("/healthz").json()["model_version"] == "v-a"


def test_cache_commands_name_a_corrupt_or_missing_sqlite_file(tmp_path):
    from typer.testing import CliRunner

    from querytune.cli import app

    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    r = CliRunner().invoke(app, ["cache", "stats", "--cache", f"sqlite:///{tmp_path}/junk.db"])
    assert (
        r.exit_code == 2
        and "junk.db" in r.output
        and "not a usable SQLite database" in r.output
        and "Traceback" not in r.output
    )
    r = CliRunner().invoke(app, ["cache", "stats", "--cache", f"sqlite:///{tmp_path}/typo.db"])
    assert r.exit_code == 2 and "no such file" in r.output and not (tmp_path / "typo.db").exists()


@pytest.mark.parametrize("kind", [SlowBackend, AsyncBackend], ids=["micro-batched", "aparse"])
def test_an_answer_is_cached_under_the_model_that_gave_it_even_if_a_promotion_lands_meanwhile(tmp_path, kind):
    import threading as _threading

    store = open_cache(f"sqlite:///{tmp_path}/cache.db")
    old, new = kind(delay=0.5), kind(delay=0.0)
    new.model_version = "m2"
    gate = create_app(old, store)
    service = gate.app.state.service
    with TestClient(gate) as client:
        swap = _threading.Timer(0.2, service.swap, args=(new,))  # while the old model is answering
        swap.start()
        assert client.get("/v1/parse", params={"q": "tacos"}).json()["source"] == "model"
        swap.join()
        client.portal.call(service.cache.drain)
    assert store.get_many(["tacos"], "s1", "m1")[0] is not None and store.get_many(["tacos"], "s1", "m2")[0] is None
