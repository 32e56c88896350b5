"""Cache-first parse serving over HTTP (FastAPI behind a pure-ASGI gate, uvicorn with uvloop and httptools).

    querytune serve --model runs/sft --cache sqlite:///runs/cache.db [--host 127.0.0.1] [--port 8000] [--backend transformers|vllm] [--workers N]

One worker process per core by default (`app_from_env` builds each worker's app; each loads its own model;
`/metrics` sums them all through prometheus_client's multiprocess folder). A request's queries are normalised and
looked up in the cache (exact match on normalised query, schema and model version): first an in-process copy of the
hot entries, then the store, off the event loop and behind a circuit breaker (`querytune.serving.serving_cache`). `GET
/v1/parse?q=` whose query the in-process copy holds is answered by the gate without entering FastAPI
(`Service.hit`): the same body, headers, key check, metrics and log line. Misses from concurrent requests are
gathered for a few milliseconds into one backend call (`MissBatcher`), or, for a backend that batches concurrent
calls itself (`async def aparse(texts) -> list[Prediction]`, e.g. vLLM's async engine), sent to it one request at a
time; the valid parses are written back in the background. A miss that the model does not answer within the deadline
gets a defined degraded answer, `source: fallback` (no parse: search the raw text), and is appended to the fallback
queue for offline labeling. The store down, hung or refusing writes: hot queries still hit the in-process copy, the
rest go to the model, and `/healthz` says `degraded`. The model down: hits still answer, misses get 503 with the
reason. With `--model active` the server follows `cache promote` / `rollback` without a restart
(`PromotionWatcher`).

Every error, of any status, has one body: `{"error": message, "code": reason, "request_id": id}`. Every response
carries `X-Request-ID`; the access log (`querytune.serving.asgi_gate.AccessLog`, on stderr) writes one JSON line per request.

Endpoints: `GET /v1/parse?q=...`, `POST /v1/parse {"queries": [...]}`, `/healthz`, `/metrics` (Prometheus), `/docs`
(Swagger UI, served locally).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from bisect import bisect_left
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote_plus

import orjson
from fastapi import Request  # at module level: FastAPI reads the dependency's annotation from here
from pydantic import BaseModel, Field

from querytune.schema import MAX_QUERY_CHARS
from querytune.serving.asgi_gate import AccessLog, Gate, Periodic
from querytune.serving.cache import Entry
from querytune.serving.label import check_query
from querytune.serving.serving_cache import ServingCache

log = logging.getLogger("querytune.serving.serve")


@dataclass
class Settings:
    max_query_chars: int = MAX_QUERY_CHARS
    max_batch: int = 64  # queries per POST
    max_body_bytes: int = 64 * 1024
    miss_deadline_s: float = 2.0  # past it a miss answers `source: fallback`
    batch_window_ms: float = 5.0  # how long the first miss waits for others to join its backend call
    max_miss_batch: int = 32
    api_key: str | None = None
    fallback_log: str | None = None  # JSONL file: queries answered by the fallback, for offline labeling
    local_cache_entries: int = 20000  # the in-process copy of hot entries that answers while the store is down
    lookup_timeout_s: float = 0.25  # a hung store costs a request at most this
    watch_promotions_s: float = 0.0  # > 0 with `--model active`: follow promotions this often


class Result(BaseModel):
    """One answered query (the body of GET /v1/parse; POST answers {"results": [Result, ...]})."""

    query: str
    normalized: str
    parse: dict[str, Any] | None = Field(description="{intent, slots}; null for a fallback answer")
    valid: bool
    source: str = Field(description="cache, model, fallback (deadline passed: search the raw text) or unavailable (model down)")
    model_version: str
    latency_ms: float
    error: str | None = None


class Batch(BaseModel):
    """The body of POST /v1/parse."""

    queries: list[str] = Field(description="Search-box queries, at most `--max-batch` of them.")


class BatchResult(BaseModel):
    """The answer to POST /v1/parse: one result per query, in order."""

    results: list[Result]


class ErrorBody(BaseModel):
    """The body of every error response (4xx and 5xx)."""

    error: str = Field(description="What went wrong, in one line")
    code: str = Field(description="auth, bad_query, batch, body, not_found, method, model_down, internal")
    request_id: str
    results: list[Result] | None = Field(None, description="POST with the model down: every query's result (hits still answer)")


class Health(BaseModel):
    status: str = Field(description="ok, or degraded (the cache store failing; answers go on)")
    model_version: str
    schema_version: str
    backend: str
    cache: dict[str, Any]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, results: list | None = None):
        self.status, self.code, self.message, self.results = status, code, message, results


class BackendDown(RuntimeError):
    """The model backend cannot answer (not loaded, crashed, unreachable)."""


def result(query: str, normalized: str, source: str, parse: dict | None = None, valid: bool = False, model_version: str = "",
           error: str | None = None, latency_ms: float = 0.0) -> dict:
    """One answered query as the API writes it (`Result`, keys in the body's order)."""
    return {"query": query, "normalized": normalized, "parse": parse, "valid": valid, "source": source, "model_version": model_version,
            "error": error, "latency_ms": latency_ms}


def given_key(headers: dict[bytes, bytes]) -> bytes:
    """The key a request sends (headers: lower-case name -> first value): X-API-Key, else an `Authorization: Bearer`
    token, read as FastAPI's APIKeyHeader and HTTPBearer read them."""
    key = headers.get(b"x-api-key")
    if key:
        return key
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


class MissBatcher:
    """Gathers concurrent misses into one backend call, run on one worker thread (the model is not shared across
    threads). `submit` returns a future of the backend's prediction for a normalised query."""

    def __init__(self, backend, window_ms: float, max_batch: int, on_batch=None, on_results=None):
        """`on_batch(n)` after each backend call; `on_results([(query, prediction), ...], model_version)` with every
        answer of a call, including those whose requests have given up waiting (so the cache still gets them), and
        the version of the model that answered (the backend may be swapped by a promotion while a call runs)."""
        self.backend, self.window, self.max_batch, self.on_batch, self.on_results = backend, window_ms / 1000, max_batch, on_batch, on_results
        self.queue: asyncio.Queue | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, query: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((query, fut))
        return fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.window
            while len(items) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            items = [(q, f) for q, f in items if not f.done()]  # callers past their deadline have gone
            if not items:
                continue
            queries = list(dict.fromkeys(q for q, _ in items))
            backend = self.backend
            try:
                preds = await loop.run_in_executor(self.pool, self._parse, backend, queries)
            except Exception as e:  # noqa: BLE001 - any backend failure is reported to each waiting request
                for _, f in items:
                    if not f.done():
                        f.set_exception(BackendDown(f"model backend failed: {type(e).__name__}: {e}"))
                continue
            by_query = dict(zip(queries, preds))
            if self.on_batch:
                self.on_batch(len(queries))
            if self.on_results:
                self.on_results(list(by_query.items()), getattr(backend, "model_version", None))
            for q, f in items:
                if not f.done():
                    f.set_result(by_query[q])

    @staticmethod
    def _parse(backend, queries: list[str]):
        if backend is None:
            raise BackendDown("no model backend is loaded")
        return backend.parse(queries)


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Histogram

    reg = CollectorRegistry()
    return reg, {
        "answers": Counter("querytune_answers", "Parsed queries answered, by source", ["source"], registry=reg),
        "errors": Counter("querytune_errors", "Requests refused or failed, by reason", ["reason"], registry=reg),
        "cache_errors": Counter("querytune_cache_errors", "Cache store reads or writes that failed", ["kind"], registry=reg),
        "latency": Histogram("querytune_request_seconds", "Request latency", ["endpoint"], registry=reg,
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
        "batch": Histogram("querytune_miss_batch_size", "Distinct queries per backend call", registry=reg,
                           buckets=(1, 2, 4, 8, 16, 32, 64)),
    }


class Tally(Periodic):
    """Answers counted and timed in plain Python and added to their Prometheus counter and histogram every `every_s`
    seconds and before a scrape: with several workers every Prometheus update is a write to a shared file, which would
    cost the cache hit it records a fifth of its time. A scrape sees other workers' hits up to `every_s` late."""

    def __init__(self, counter, histogram, every_s: float = 0.5):
        self.counter, self.histogram, self.every_s = counter, histogram, every_s
        self.bounds = histogram._upper_bounds  # the histogram's own buckets, +Inf last
        self.counts, self.total = [0] * len(self.bounds), 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.arm()

    def flush(self) -> None:
        self.disarm()
        counts, total, self.counts, self.total = self.counts, self.total, [0] * len(self.bounds), 0.0
        if any(counts):
            # what `observe` does once per value (prometheus_client keeps no public way to add many at once)
            self.counter.inc(sum(counts))
            self.histogram._sum.inc(total)
            for bucket, n in zip(self.histogram._buckets, counts):
                if n:
                    bucket.inc(n)


class Service:
    """What the routes share: the model (swappable on promotion), the cache, the batcher and the metrics."""

    def __init__(self, backend, cache_store, settings: Settings, model_version: str, schema_version: str):
        self.backend, self.settings = backend, settings
        self.model_version, self.schema_version = model_version, schema_version
        self.registry, self.m = _metrics()
        self.cache = ServingCache(cache_store, schema_version, settings.local_cache_entries, settings.lookup_timeout_s,
                                  on_error=lambda kind: self.m["cache_errors"].labels(kind).inc())
        self.batcher = MissBatcher(backend, settings.batch_window_ms, settings.max_miss_batch, on_batch=self.m["batch"].observe,
                                   on_results=self.write_answers)
        self.calls: set[asyncio.Task] = set()  # `aparse` calls in flight (they outlive a request past its deadline)
        self.fallback_lock = threading.Lock()
        self.key = (settings.api_key or "").encode()
        # a hit's query string -> [query, normalised, the entry last answered, its body up to latency_ms]: a hit's work, done once
        self.queries: dict[bytes, list] = {}
        self.hit_tally = Tally(self.m["answers"].labels("cache"), self.m["latency"].labels("get"))

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        # constant time: the comparison leaks nothing about the key
        return not self.key or hmac.compare_digest(given_key(headers), self.key)

    def hit(self, scope: dict, headers: dict[bytes, bytes]) -> bytes | None:
        """The body of `GET /v1/parse?q=` when the key is right and the in-process copy holds the query: what the
        route would answer, counted and timed the same, without entering FastAPI (the gate asks this first). None
        for anything else (another route, a second parameter, a bad query or key, a miss): the app answers it."""
        if scope["method"] != "GET" or scope["path"] != "/v1/parse" or not self.authorized(headers):
            return None
        t0 = time.perf_counter()
        qs = scope["query_string"]
        known = self.queries.get(qs)
        if known is None:
            if qs[:2] != b"q=" or b"&" in qs:
                return None
            raw = unquote_plus(qs[2:].decode("latin-1"), errors="replace")  # how Starlette reads a query parameter
            norm, _ = check_query(raw, self.settings.max_query_chars)
            known = [raw, norm, None, b""]
        e = self.cache.local.get((self.model_version, known[1])) if known[1] else None
        if e is None:
            return None
        if known[2] is not e:  # latency_ms is the body's last key: all before it is the entry's, written once
            known[2], known[3] = e, orjson.dumps(result(known[0], known[1], "cache", e.parse, e.valid, e.model_version))[:-len(b"0.0}")]
            if len(self.queries) >= self.settings.local_cache_entries:
                self.queries.clear()
            self.queries[qs] = known
        seconds = time.perf_counter() - t0
        self.hit_tally.add(seconds)
        return b"%s%r}" % (known[3], round(1000 * seconds, 3))

    def submit(self, query: str) -> asyncio.Future:
        """A future of the model's prediction for a normalised query: through the batcher, or for a backend with
        `aparse` (it batches concurrent calls itself), a call of its own."""
        backend = self.backend
        if not hasattr(backend, "aparse"):
            return self.batcher.submit(query)
        fut = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(self._aparse(backend, query, fut))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)
        return fut

    async def _aparse(self, backend, query: str, fut: asyncio.Future) -> None:
        try:
            [prediction] = await backend.aparse([query])
        except Exception as e:  # noqa: BLE001 - any backend failure is reported to the waiting request
            if not fut.done():
                fut.set_exception(BackendDown(f"model backend failed: {type(e).__name__}: {e}"))
            return
        self.m["batch"].observe(1)
        self.write_answers([(query, prediction)], backend.model_version)  # also when the request has given up waiting
        if not fut.done():
            fut.set_result(prediction)

    def swap(self, backend) -> None:
        """Serve another model from now on (a promotion); misses in flight finish with the old one."""
        self.backend = self.batcher.backend = backend
        self.model_version, self.schema_version = backend.model_version, backend.schema_version
        self.cache.schema_version = backend.schema_version

    def write_answers(self, answers: list[tuple[str, Any]], version: str) -> None:
        self.cache.write_back([(q, Entry(p.parse, True, float(p.confidence), version)) for q, p in answers if p.valid])

    def queue_fallback(self, queries: list[str]) -> None:
        if self.settings.fallback_log and queries:
            with self.fallback_lock, open(self.settings.fallback_log, "a", encoding="utf-8") as f:
                for q in queries:
                    f.write(json.dumps({"query": q, "at": time.time()}) + "\n")

    async def answer(self, raw: list[str]) -> tuple[list[dict], int]:
        """Each query's result in order, and 200, or 503 when a miss found the model down. Bad input: ApiError 400."""
        t0, s, version = time.perf_counter(), self.settings, self.model_version
        norms = []
        for q in raw:
            norm, reason = check_query(q, s.max_query_chars)
            if reason:
                raise ApiError(400, "bad_query", f"query {q[:40]!r}: {reason}")
            norms.append(norm)

        found = await self.cache.get_many(norms, version)
        results: list[dict | None] = [None] * len(raw)
        waits: dict[str, asyncio.Future] = {}
        for i, (n, e) in enumerate(zip(norms, found)):
            if e is not None:
                results[i] = result(raw[i], n, "cache", e.parse, e.valid, e.model_version)
            elif n not in waits:
                waits[n] = self.submit(n)
        status, fallbacks = 200, []
        if waits:
            done, _ = await asyncio.wait(waits.values(), timeout=s.miss_deadline_s)
            for fut in waits.values():
                if fut not in done:
                    fut.cancel()
        for i, n in enumerate(norms):
            if results[i] is not None:
                continue
            fut = waits[n]
            if fut.cancelled():
                results[i] = result(raw[i], n, "fallback", model_version=version,
                                    error=f"no model answer within {s.miss_deadline_s:g} s: search the raw text; queued for offline labeling")
                fallbacks.append(n)
            elif fut.exception() is not None:
                status = 503
                results[i] = result(raw[i], n, "unavailable", model_version=version, error=str(fut.exception()))
            else:
                p = fut.result()
                results[i] = result(raw[i], n, "model", p.parse, bool(p.valid), version, p.error)
        self.queue_fallback(list(dict.fromkeys(fallbacks)))
        ms = round(1000 * (time.perf_counter() - t0), 3)
        for r in results:
            r["latency_ms"] = ms
            self.m["answers"].labels(r["source"]).inc()
        return results, status  # type: ignore[return-value]


class PromotionWatcher:
    """With `--model active`: polls the cache's promotion record and swaps the served model when it changes (a
    promotion or a rollback), loading the new one on a thread while the old one keeps answering."""

    def __init__(self, service: Service, store, load: Callable[[Path], Any], every_s: float, current_dir: str | None = None):
        self.service, self.store, self.load, self.every_s = service, store, load, every_s
        self.current = current_dir
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    async def check(self) -> bool:
        """One poll; True when the served model changed."""
        loop = asyncio.get_running_loop()
        try:
            record = await loop.run_in_executor(self.service.cache.pool, self.store.active)
        except Exception as e:  # noqa: BLE001 - the store down: keep serving the current model
            log.warning("promotion check failed: %s", e)
            return False
        if not record or record["model_dir"] == self.current:
            return False
        try:
            backend = await loop.run_in_executor(None, self.load, Path(record["model_dir"]))
        except Exception as e:  # noqa: BLE001 - a bad promotion must not take the server down
            log.error("promoted model %s could not be loaded, still serving %s: %s", record["model_dir"], self.current, e)
            self.current = record["model_dir"]  # do not retry it every poll; the next promotion is tried
            return False
        self.service.swap(backend)
        log.warning("now serving %s (model version %s)", record["model_dir"], backend.model_version)
        self.current = record["model_dir"]
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            await self.check()


def create_app(backend, cache, settings: Settings | None = None, model_version: str | None = None, schema_version: str | None = None,
               watch: Callable[[Service], PromotionWatcher] | None = None, access: AccessLog | None = None):
    """The ASGI app. `backend`: a model backend (`querytune.runtime.backends`) or None (every miss gets 503); `cache`: a
    `querytune.serving.cache` store or None; `watch`: builds the promotion watcher (`--model active`); `access`: where the
    access log goes (None: nowhere)."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
    from fastapi_offline import FastAPIOffline
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    from starlette.exceptions import HTTPException

    settings = settings or Settings()
    service = Service(backend, cache, settings, model_version or backend.model_version, schema_version or backend.schema_version)
    m = service.m
    watcher = watch(service) if watch else None

    @asynccontextmanager
    async def lifespan(_app):
        service.batcher.start()
        if watcher:
            watcher.start()
        yield
        if watcher:
            await watcher.stop()
        await service.batcher.stop()
        for call in list(service.calls):
            call.cancel()
        service.hit_tally.flush()
        await service.cache.drain()
        service.cache.close()
        close = getattr(service.backend, "close", None)  # vLLM's engine runs in processes of its own
        if close:
            close()
        if access:
            access.flush()

    app = FastAPIOffline(title="querytune", version="1", lifespan=lifespan,
                         description="Cache-first query understanding: a query in, its intent + slots parse out.")
    app.state.service = service
    errors = {400: "Bad query (empty, too long, control characters, not text) or a malformed body", 401: "Missing or wrong API key",
              413: "Too many queries or too large a body", 503: "The model backend is down (cached queries still answer)"}
    responses = {code: {"model": ErrorBody, "description": text} for code, text in errors.items()}

    def reply(request: Request, status: int, code: str, message: str, results: list | None = None) -> JSONResponse:
        m["errors"].labels(code).inc()
        body = {"error": message, "code": code, "request_id": request.scope.get("state", {}).get("request_id", "")}
        return JSONResponse(body | ({"results": results} if results is not None else {}), status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return reply(request, e.status, e.code, e.message, e.results)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        # the input is never echoed: it may be NaN, 1e999 or a lone surrogate, which JSON cannot carry back
        where = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in e.errors()[:3])
        return reply(request, 400, "bad_query", f"malformed request: {where}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = {400: "bad_query", 401: "auth", 404: "not_found", 405: "method"}.get(e.status_code, "http")
        return reply(request, e.status_code, code, str(e.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("unhandled error in request %s", request.scope.get("state", {}).get("request_id"))
        return reply(request, 500, "internal", f"internal error ({type(e).__name__}); see the server log")

    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's API key (`--api-key`)")
    bearer = HTTPBearer(auto_error=False, description="The same key as a bearer token")

    # the two schemes document the key in the OpenAPI; the check is the hit path's own, on the raw headers
    async def authorized(request: Request, _key: str | None = Depends(key_header), _token: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not service.authorized(dict(reversed(request.scope["headers"]))):
            raise ApiError(401, "auth", "missing or wrong API key (send X-API-Key or Authorization: Bearer)")

    def ok(body) -> Response:  # what the hit path writes too (orjson: a twentieth of json.dumps's time)
        return Response(orjson.dumps(body), media_type="application/json")

    def timed(endpoint: str, t0: float) -> None:
        m["latency"].labels(endpoint).observe(time.perf_counter() - t0)

    @app.get("/v1/parse", response_model=Result, responses=responses, dependencies=[Depends(authorized)], summary="Parse one query")
    async def parse_one(q: str = Query(..., description="The search-box query.")):
        t0 = time.perf_counter()
        results, status = await service.answer([q])
        timed("get", t0)
        if status != 200:
            raise ApiError(status, "model_down", results[0]["error"])
        return ok(results[0])

    @app.post("/v1/parse", response_model=BatchResult, responses=responses, dependencies=[Depends(authorized)], summary="Parse a batch of queries")
    async def parse_many(batch: Batch):
        t0 = time.perf_counter()
        if not batch.queries:
            raise ApiError(400, "bad_query", "queries: give at least one")
        if len(batch.queries) > settings.max_batch:
            raise ApiError(413, "batch", f"batch of {len(batch.queries)} queries; at most {settings.max_batch}")
        results, status = await service.answer(batch.queries)
        timed("post", t0)
        if status == 503:
            raise ApiError(503, "model_down", "the model backend is down; cached queries are answered in `results`", results)
        return ok({"results": results})

    @app.get("/healthz", response_model=Health, summary="Liveness and state (no key needed)")
    async def healthz():
        await service.cache.probe()
        cache_health = service.cache.health()
        b = service.backend
        return {"status": "degraded" if cache_health["state"] == "degraded" else "ok", "model_version": service.model_version,
                "schema_version": service.schema_version, "backend": getattr(b, "name", "none") if b is not None else "down", "cache": cache_health}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        service.hit_tally.flush()
        registry = service.registry
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # several workers (`querytune serve` sets it): a scrape sums them all
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    return Gate(app, settings.max_body_bytes, on_refuse=lambda code: m["errors"].labels(code).inc(), access=access, answer=service.hit)


def resolve_model(model: str, cache) -> Path:
    """`--model DIR`, or `active`: the model the cache's last promotion names."""
    if model != "active":
        return Path(model)
    record = cache.active() if cache is not None else None
    if not record:
        raise ValueError("--model active: the cache records no promotion (run `querytune cache promote --model DIR` first)")
    return Path(record["model_dir"])


def app_from_env():
    """The app of one server worker, built from `QUERYTUNE_SERVE` (the JSON of `querytune serve`'s resolved options,
    which the command sets): `uvicorn.run("querytune.serving.serve:app_from_env", factory=True, workers=N)`. Each worker
    loads its own model and keeps its own in-process cache copy."""
    import torch

    from querytune.runtime.backends import load_backend
    from querytune.serving.cache import open_cache

    o = json.loads(os.environ["QUERYTUNE_SERVE"])
    if o["workers"] > 1:
        _exit_with(o["supervisor"])
    torch.set_num_threads(o["threads"])  # the workers share the cores
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    # a short lock wait: a `cache warm` writing the same SQLite file must not hold requests
    store = open_cache(o["cache"], busy_timeout_s=0.05) if o["cache"] else None
    model_dir = resolve_model(o["model"], store)
    # a server's vLLM: the async engine, which batches misses itself
    options = {"engine": "async"} if o["backend"] == "vllm" else {"int8": True} if o.get("int8") else {}
    load = lambda path: load_backend(o["backend"], path, **options)  # noqa: E731
    watch = None
    if o["model"] == "active" and o["watch_s"] > 0:
        watch = lambda service: PromotionWatcher(service, store, load, o["watch_s"], str(model_dir))  # noqa: E731
    backend = load(model_dir)
    log.warning("worker %d: model %s version %s on %s", os.getpid(), model_dir, backend.model_version, o["backend"])
    app = create_app(backend, store, Settings(**o["settings"]), watch=watch, access=AccessLog(sys.stderr.fileno()) if o["access_log"] else None)
    gc.freeze()  # the model's objects live as long as the worker: no collection need walk them again
    return app


def _exit_with(supervisor: int) -> None:
    """A worker ends (SIGTERM) when the process that started it dies, even by SIGKILL: no orphan keeps the port."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != supervisor:  # it died before the line above
        raise SystemExit(f"the server's supervisor (pid {supervisor}) has gone")
