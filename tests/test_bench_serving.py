"""eval/bench_serving.py's own parts: the least hit path it compares the server's hits with, and the miss load that
counts a steady-state window (their figures are the benchmark's; here only that they count what they say)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import bench_serving as bench  # noqa: E402

from querytune.testing import free_port  # noqa: E402


def test_the_least_hit_path_answers_a_kept_body_with_its_latency_and_refuses_a_wrong_key(tmp_path, monkeypatch):
    bodies = tmp_path / "bodies.json"
    bodies.write_text(json.dumps({"q=cheap%20thai": '{"query":"cheap thai","source":"cache","latency_ms":'}))
    monkeypatch.setenv("BENCH_HIT_BODIES", str(bodies))
    app = bench.least_hit()

    async def get(headers):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 5000)), base_url="http://bench"
        ) as client:
            return await client.get("/v1/parse?q=cheap%20thai", headers=headers)

    ok, wrong = asyncio.run(get({"X-API-Key": bench.KEY})), asyncio.run(get({"X-API-Key": "nope"}))
    body = ok.json()
    assert ok.status_code == 200 and body["query"] == "cheap thai" and 0 <= body["latency_ms"] < 1000
    assert ok.headers["content-length"] == str(len(ok.content)) and ok.headers["x-request-id"]
    assert wrong.status_code == 401


@pytest.fixture()
def model_server():
    """A stand-in for a miss server: every answer takes 20 ms and says it came from the model."""
    seen: list[str] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        seen.append(scope["query_string"].decode())
        await asyncio.sleep(0.02)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"source": "model"}'})

    server = uvicorn.Server(uvicorn.Config(app, port=free_port(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{server.config.port}", seen
    server.should_exit = True
    thread.join()


def test_the_miss_load_counts_the_answers_of_its_window_and_sends_each_query_once(model_server):
    base, seen = model_server
    queries = [f"query {i}" for i in range(10_000)]
    warm = bench.miss_load(base, iter(queries[:6]), 4, 900, warm_up=True)
    assert asyncio.run(warm)["sent"] == 6, "a warm-up sends all its queries, however short the list"
    run = asyncio.run(bench.miss_load(base, iter(queries[6:]), 4, 1.0, 0.4))
    assert run["sources"] == {"model": run["sent"]} and 0 < run["counted"] < run["sent"]
    assert run["requests_per_s"] == round(run["counted"] / 0.6, 2), "the rate is the window's answers over the window"
    assert len(seen) == len(set(seen)) == 6 + run["sent"], "every query distinct, none sent twice"


def test_the_miss_load_stops_with_a_message_when_the_queries_run_out(model_server):
    base, _ = model_server
    with pytest.raises(SystemExit, match="the distinct queries ran out after .* lower --miss-seconds"):
        asyncio.run(bench.miss_load(base, iter(["a", "b", "c"]), 2, 30, 5))


def test_the_miss_load_stops_with_a_message_when_no_answer_falls_in_its_window(model_server):
    base, _ = model_server
    # every answer takes 20 ms, so none can arrive in a run that ends after 10 ms
    with pytest.raises(SystemExit, match="no answer arrived between 0.005 s and 0.01 s .* raise --miss-seconds"):
        asyncio.run(bench.miss_load(base, iter(f"q{i}" for i in range(1000)), 1, 0.01, 0.005))
