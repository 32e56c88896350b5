"""What an operator did to the server, each once: a fallback log that cannot be written, a broken model folder,
slow and half-closed clients, SIGTERM under load, a store that refused writes and came back, a store that died with
lookups in flight. Each is a clear line or an answer, never a traceback, a 500 or a lost request."""

from __future__ import annotations

import asyncio
import gc
import shutil
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_serve import SlowBackend
from typer.testing import CliRunner

from querytune.cli import app as cli
from querytune.serving.asgi_gate import Gate
from querytune.serving.cache import Entry, open_cache
from querytune.serving.serve import create_app
from querytune.serving.serving_cache import ServingCache
from querytune.serving.settings import Settings
from querytune.testing import start_server


@pytest.mark.parametrize("where", ["missing/f.jsonl", "a-folder"])
def test_a_fallback_log_that_cannot_be_opened_stops_serve_at_start_with_one_line(where, tiny_model, tmp_path):
    (tmp_path / "a-folder").mkdir()
    result = CliRunner().invoke(
        cli, ["serve", "--model", str(tiny_model), "--workers", "1", "--fallback-log", str(tmp_path / where)]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().startswith("error: --fallback-log") and len(result.stderr.strip().splitlines()) == 1


def test_every_serve_option_is_a_settings_field_and_reaches_the_settings(tiny_model, tmp_path, monkeypatch):
    """The command's parameters carry the settings' field names (a parameter named otherwise would be dropped
    silently), and what the command line gives is what the server runs with."""
    import inspect

    import querytune.cli.serve as serve_cli

    assert set(inspect.signature(serve_cli.serve).parameters) == set(Settings.model_fields) - {
        "threads",
        "supervisor_pid",
    }
    ran = {}
    monkeypatch.setattr(serve_cli, "run", lambda settings, store, backend: ran.update(settings=settings, store=store))
    url = f"sqlite:///{tmp_path}/c.db"
    args = ["serve", "--model", str(tiny_model), "--cache", url, "--workers", "1", "--deadline", "0.5"]
    result = CliRunner().invoke(cli, [*args, "--watch-promotions", "3", "--body-timeout", "4", "--no-access-log"])
    assert result.exit_code == 0, result.output
    s = ran["settings"]
    assert (s.cache_url, s.deadline, s.watch_promotions, s.body_timeout, s.access_log) == (url, 0.5, 3.0, 4.0, False)
    assert ran["store"].url == url


def test_watch_promotions_reads_its_own_variable_and_the_old_name_with_a_warning(tiny_model, monkeypatch):
    import querytune.cli.serve as serve_cli

    ran = {}
    monkeypatch.setattr(serve_cli, "run", lambda settings, store, backend: ran.update(settings=settings))
    args = ["serve", "--model", str(tiny_model), "--workers", "1"]
    for env, extra, seconds, warned in (
        ({"QUERYTUNE_WATCH_PROMOTIONS": "2"}, [], 2.0, False),
        ({"QUERYTUNE_WATCH_S": "3"}, [], 3.0, True),  # the old name still works, said in one line
        ({"QUERYTUNE_WATCH_S": "3", "QUERYTUNE_WATCH_PROMOTIONS": "4"}, [], 4.0, False),
        ({"QUERYTUNE_WATCH_S": "3"}, ["--watch-promotions", "5"], 5.0, False),
    ):
        result = CliRunner().invoke(cli, args + extra, env=env)
        assert result.exit_code == 0, result.output
        assert ran["settings"].watch_promotions == seconds, env
        assert ("QUERYTUNE_WATCH_S is now QUERYTUNE_WATCH_PROMOTIONS" in result.stderr) == warned, env
    result = CliRunner().invoke(cli, args, env={"QUERYTUNE_WATCH_S": "soon", "COLUMNS": "200"})
    assert result.exit_code == 2 and "QUERYTUNE_WATCH_S: 'soon' is not a number" in result.output


def test_a_fallback_log_on_a_full_disk_costs_lines_not_answers():
    settings = Settings(deadline=0.001, fallback_log="/dev/full")  # opens, and every write fails with ENOSPC
    with TestClient(create_app(SlowBackend(delay=0.5), None, settings)) as client:
        answers = [client.get("/v1/parse", params={"q": f"plumber {i}"}) for i in range(5)]
        assert [r.status_code for r in answers] == [200] * 5
        assert {r.json()["source"] for r in answers} == {"fallback"}


@pytest.mark.parametrize(
    "break_it",
    [
        lambda m: (m / "querytune.json").write_text("{"),
        lambda m: (m / "querytune.json").write_text("null"),
        lambda m: (m / "schema.yaml").write_text(": : ["),
        lambda m: (m / "adapter_model.safetensors").write_bytes(b""),
    ],
    ids=["meta-torn", "meta-null", "schema-torn", "weights-empty"],
)
def test_serve_on_a_broken_model_folder_exits_2_with_one_line_naming_the_file(break_it, tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    break_it(broken)
    result = CliRunner().invoke(cli, ["serve", "--model", str(broken), "--workers", "2"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and len(line.splitlines()) == 1 and str(broken) in line


def test_a_body_that_does_not_arrive_in_time_gets_408():
    sent = []

    async def never(*_):  # a client that sent its headers and stalls in the body
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):  # never reached
        raise AssertionError("the app got a request whose body never came")

    scope = {"type": "http", "method": "POST", "path": "/v1/parse", "headers": [(b"content-length", b"100")]}
    asyncio.run(Gate(app, 1000, body_timeout_s=0.05)(scope, never, send))
    assert sent[0]["status"] == 408 and b"not received within 0.05 s" in sent[1]["body"]


def test_a_miss_checks_the_key_once_and_normalises_the_query_once(monkeypatch):
    import querytune.serving.service as service_module

    gate = create_app(SlowBackend(delay=0.0), None, Settings(api_key="k"))
    calls = {"key": 0, "check": 0}
    service = gate.app.state.service
    authorized, check = service.authorized, service_module.check_query

    def counted_key(headers):
        calls["key"] += 1
        return authorized(headers)

    def counted_check(*a, **kw):
        calls["check"] += 1
        return check(*a, **kw)

    gate.authorized = counted_key
    monkeypatch.setattr(service_module, "check_query", counted_check)
    with TestClient(gate) as client:
        assert (
            client.get("/v1/parse", params={"q": "Cheap Thai"}, headers={"X-API-Key": "k"}).json()["source"] == "model"
        )
        assert calls == {"key": 1, "check": 1}
        assert client.get("/v1/parse", params={"q": "x"}, headers={"X-API-Key": "bad"}).status_code == 401


def test_answers_the_store_refused_are_written_once_it_takes_writes_again(tmp_path):
    url = f"sqlite:///{tmp_path}/c.db"
    store = open_cache(url, busy_timeout_s=0.05)
    lock = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another writer holds the file: every write is refused

    async def run() -> dict:
        cache = ServingCache(store, "s1", retry_s=0.05)
        cache.start()
        cache.write_back([(f"q{i}", Entry(None, True, 0.5, "m1")) for i in range(20)])
        await cache.drain()
        refused = cache.health()["pending_writes"]
        lock.execute("ROLLBACK")
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not cache.refused:
                break
        cache.close()
        return {"refused": refused, **cache.health()}

    health = asyncio.run(run())
    assert health["refused"] == 20 and health["pending_writes"] == 0 and health["rewritten"] == 20
    assert sum(e is not None for e in store.get_many([f"q{i}" for i in range(20)], "s1", "m1")) == 20


def test_a_store_that_fails_after_its_lookup_was_given_up_leaves_no_unretrieved_future():
    class DiesLate:
        url = "fake://dies-late"

        def get_many(self, *_):
            time.sleep(0.1)
            raise ConnectionError("gone")

    reported = []

    async def run():
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context))
        cache = ServingCache(DiesLate(), "s1", lookup_timeout_s=0.01)
        assert await cache.get_many(["pizza"], "m1") == [None]
        await asyncio.sleep(0.3)  # the store's call ends with its error
        cache.close()
        gc.collect()  # an unretrieved exception is reported when its future is collected

    asyncio.run(run())
    assert [c.get("message") for c in reported] == []


def http_get(port: int, query: str, half_close: bool = False, timeout: float = 20.0, path: str = "") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path or f'/v1/parse?q={query}'} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        if half_close:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_slow_half_closed_and_stopped_clients_of_a_real_server(tiny_model, tmp_path):
    """One real server (two workers): a client that half-closes after its request gets the answer to a miss; a
    connection that sends a body too slowly is closed with 408 after --body-timeout, one that sends no headers is
    closed; connections past --max-connections get 503 at once; SIGTERM answers every request that reached an open
    connection."""
    args = [
        "--model",
        str(tiny_model),
        "--workers",
        "2",
        "--body-timeout",
        "1",
        "--max-connections",
        "20",
        "--cache",
        f"sqlite:///{tmp_path}/c.db",
    ]
    proc, base = start_server(args, tmp_path / "log")
    port = int(base.rsplit(":", 1)[1])
    try:
        assert b'"state":"ok"' in http_get(port, "", path="/healthz")
        assert http_get(port, "sushi+downtown", half_close=True).startswith(b"HTTP/1.1 200")

        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]  # within each worker's 20
        for s in stalled[:10]:
            s.sendall(b"POST /v1/parse HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        for s in stalled[10:]:
            s.sendall(b"GET /v1/parse?q=pizza HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        time.sleep(1.0 + 1.5)
        ends = []
        for s in stalled:
            s.settimeout(2)
            try:
                ends.append(s.recv(65536))
            except (ConnectionResetError, socket.timeout) as e:
                ends.append(type(e).__name__.encode())
            s.close()
        assert all(e.startswith(b"HTTP/1.1 408") for e in ends[:10]), ends[:10]
        assert all(e == b"" or e == b"ConnectionResetError" for e in ends[10:]), ends[10:]

        crowd = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]  # 2 workers, 20 each at most
        time.sleep(0.5)
        busy = 0
        for s in crowd:
            s.settimeout(0.2)
            try:
                busy += s.recv(65536).startswith(b"HTTP/1.1 503")
            except socket.timeout:
                pass
            s.close()
        assert busy >= 20, busy

        results, stop = [], threading.Event()

        def client(i: int):  # one keep-alive connection, a request at a time, until the server closes it
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=20)
            except OSError:
                return
            with s:
                n = 0
                while not stop.is_set():
                    try:
                        s.sendall(f"GET /v1/parse?q=plumber+{i}+{n % 3} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    except OSError:
                        return  # not sent: nothing was accepted
                    data = b""
                    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
                        try:
                            chunk = s.recv(65536)
                        except OSError:
                            chunk = b""
                        if not chunk:
                            break
                        data += chunk
                    results.append(data[:12])
                    if not data or b"connection: close" in data.lower():
                        return
                    n += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert results and all(r.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503")) for r in results), [
            r for r in results if not r.startswith(b"HTTP/1.1 200")
        ]
        log = Path(tmp_path / "log").read_text()
        assert "Traceback" not in log and "never retrieved" not in log
    finally:
        if proc.poll() is None:
            proc.kill()
