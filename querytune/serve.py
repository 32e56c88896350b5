"""Cache-first parse serving over HTTP (FastAPI).

    querytune serve --model runs/sft --cache sqlite:///runs/cache.db [--host 127.0.0.1] [--port 8000] [--backend transformers|vllm]

A request's queries are normalised and looked up in the cache (exact match on normalised query, schema and model
version). Misses from concurrent requests are gathered for a few milliseconds into one backend call (`MissBatcher`)
and the valid parses written back. A miss that the model does not answer within the deadline gets a defined degraded
answer, `source: fallback` (no parse: search the raw text), and is appended to the fallback queue for offline
labeling. The cache down (Redis unreachable): every query goes to the model. The model down: hits still answer,
misses get 503 with the reason.

Endpoints: `GET /v1/parse?q=...`, `POST /v1/parse {"queries": [...]}`, `/healthz`, `/metrics` (Prometheus), `/docs`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from querytune.cache import CacheUnavailable, Entry
from querytune.label import check_query


@dataclass
class Settings:
    max_query_chars: int = 256
    max_batch: int = 64  # queries per POST
    max_body_bytes: int = 64 * 1024
    miss_deadline_s: float = 2.0  # past it a miss answers `source: fallback`
    batch_window_ms: float = 5.0  # how long the first miss waits for others to join its backend call
    max_miss_batch: int = 32
    api_key: str | None = None
    fallback_log: str | None = None  # JSONL file: queries answered by the fallback, for offline labeling


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

    queries: list[str]


class BackendDown(RuntimeError):
    """The model backend cannot answer (not loaded, crashed, unreachable)."""


class MissBatcher:
    """Gathers concurrent misses into one backend call, run on one worker thread (the model is not shared across
    threads). `submit` returns a future of the backend's prediction for a normalised query."""

    def __init__(self, backend, window_ms: float, max_batch: int, on_batch=None, on_results=None):
        """`on_batch(n)` after each backend call; `on_results([(query, prediction), ...])` with every answer of a
        call, including those whose requests have given up waiting (so the cache still gets them)."""
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
            try:
                preds = await loop.run_in_executor(self.pool, self._parse, queries)
            except Exception as e:  # noqa: BLE001 - any backend failure is reported to each waiting request
                for _, f in items:
                    if not f.done():
                        f.set_exception(BackendDown(f"model backend failed: {type(e).__name__}: {e}"))
                continue
            by_query = dict(zip(queries, preds))
            if self.on_batch:
                self.on_batch(len(queries))
            if self.on_results:
                self.on_results(list(by_query.items()))
            for q, f in items:
                if not f.done():
                    f.set_result(by_query[q])

    def _parse(self, queries: list[str]):
        if self.backend is None:
            raise BackendDown("no model backend is loaded")
        return self.backend.parse(queries)


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Histogram

    reg = CollectorRegistry()
    return reg, {
        "answers": Counter("querytune_answers", "Parsed queries answered, by source", ["source"], registry=reg),
        "errors": Counter("querytune_errors", "Requests refused or failed, by reason", ["reason"], registry=reg),
        "cache_errors": Counter("querytune_cache_errors", "Cache lookups or writes that failed (store down)", registry=reg),
        "latency": Histogram("querytune_request_seconds", "Request latency", ["endpoint"], registry=reg,
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
        "batch": Histogram("querytune_miss_batch_size", "Distinct queries per backend call", registry=reg,
                           buckets=(1, 2, 4, 8, 16, 32, 64)),
    }


def create_app(backend, cache, settings: Settings | None = None, model_version: str | None = None, schema_version: str | None = None):
    """The FastAPI app. `backend`: a model backend (`querytune.backends`) or None (every miss gets 503);
    `cache`: a `querytune.cache` cache or None."""
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import generate_latest

    settings = settings or Settings()
    model_version = model_version or backend.model_version
    schema_version = schema_version or backend.schema_version
    registry, m = _metrics()
    fallback_lock = threading.Lock()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="querytune", version="1", lifespan=lifespan,
                  description="Cache-first query understanding: a query in, its intent + slots parse out.")

    def refuse(status: int, reason: str, message: str) -> JSONResponse:
        m["errors"].labels(reason).inc()
        return JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if settings.api_key and request.headers.get("x-api-key") != settings.api_key \
                    and request.headers.get("authorization") != f"Bearer {settings.api_key}":
                return refuse(401, "auth", "missing or wrong API key (send X-API-Key or Authorization: Bearer)")
            size = request.headers.get("content-length")
            if size and int(size) > settings.max_body_bytes:
                return refuse(413, "body", f"request body of {int(size)} bytes; at most {settings.max_body_bytes}")
        return await call_next(request)

    def lookup(norms: list[str]) -> list[Entry | None]:
        if cache is None:
            return [None] * len(norms)
        try:
            return cache.get_many(norms, schema_version, model_version)
        except CacheUnavailable:
            m["cache_errors"].inc()
            return [None] * len(norms)

    def write_back(items: list[tuple[str, Entry]]) -> None:
        if cache is None or not items:
            return
        try:
            cache.put_many(items, schema_version)
        except CacheUnavailable:
            m["cache_errors"].inc()

    def write_answers(answers: list[tuple[str, Any]]) -> None:
        write_back([(q, Entry(p.parse, True, float(p.confidence), model_version)) for q, p in answers if p.valid])

    batcher = MissBatcher(backend, settings.batch_window_ms, settings.max_miss_batch, on_batch=m["batch"].observe, on_results=write_answers)

    def queue_fallback(queries: list[str]) -> None:
        if settings.fallback_log:
            with fallback_lock, open(settings.fallback_log, "a", encoding="utf-8") as f:
                for q in queries:
                    f.write(json.dumps({"query": q, "at": time.time()}) + "\n")

    async def answer(raw: list[str]) -> tuple[list[dict], int]:
        t0 = time.perf_counter()
        norms = []
        for q in raw:
            norm, reason = check_query(q, settings.max_query_chars)
            if reason:
                return [{"error": f"query {q[:40]!r}: {reason}"}], 400
            norms.append(norm)
        found = lookup(norms)
        results: list[dict | None] = [None] * len(raw)
        waits: dict[str, asyncio.Future] = {}
        for i, (q, n, e) in enumerate(zip(raw, norms, found)):
            if e is not None:
                results[i] = {"query": q, "normalized": n, "parse": e.parse, "valid": e.valid, "source": "cache", "model_version": e.model_version}
            elif n not in waits:
                waits[n] = batcher.submit(n)
        status, fallbacks = 200, []
        if waits:
            done, _ = await asyncio.wait(waits.values(), timeout=settings.miss_deadline_s)
            for n, fut in waits.items():
                if fut not in done:
                    fut.cancel()
        for i, (q, n) in enumerate(zip(raw, norms)):
            if results[i] is not None:
                continue
            fut = waits[n]
            if fut.cancelled():
                results[i] = {"query": q, "normalized": n, "parse": None, "valid": False, "source": "fallback", "model_version": model_version,
                              "error": f"no model answer within {settings.miss_deadline_s:g} s: search the raw text; queued for offline labeling"}
                fallbacks.append(n)
            elif fut.exception() is not None:
                status = 503
                results[i] = {"query": q, "normalized": n, "parse": None, "valid": False, "source": "unavailable",
                              "model_version": model_version, "error": str(fut.exception())}
            else:
                p = fut.result()
                results[i] = {"query": q, "normalized": n, "parse": p.parse, "valid": bool(p.valid), "source": "model",
                              "model_version": model_version, "error": p.error}
        queue_fallback(list(dict.fromkeys(fallbacks)))
        ms = round(1000 * (time.perf_counter() - t0), 3)
        for r in results:
            r["latency_ms"] = ms
            m["answers"].labels(r["source"]).inc()
        return results, status  # type: ignore[return-value]

    @app.get("/v1/parse", response_model=Result, summary="Parse one query")
    async def parse_one(q: str = Query(..., description="The search-box query.")):
        t0 = time.perf_counter()
        results, status = await answer([q])
        m["latency"].labels("get").observe(time.perf_counter() - t0)
        if status != 200:
            return refuse(status, "bad_query" if status == 400 else "model_down", results[0]["error"])
        return JSONResponse(results[0])

    @app.post("/v1/parse", summary="Parse a batch of queries")
    async def parse_many(batch: Batch):
        t0 = time.perf_counter()
        if not batch.queries:
            return refuse(400, "bad_query", "queries: give at least one")
        if len(batch.queries) > settings.max_batch:
            return refuse(413, "batch", f"batch of {len(batch.queries)} queries; at most {settings.max_batch}")
        results, status = await answer(batch.queries)
        m["latency"].labels("post").observe(time.perf_counter() - t0)
        if status == 400:
            return refuse(400, "bad_query", results[0]["error"])
        if status == 503:
            m["errors"].labels("model_down").inc()
        return JSONResponse({"results": results}, status_code=status)

    @app.get("/healthz")
    async def healthz():
        cache_state = "none"
        if cache is not None:
            try:
                cache.get_many(["healthz"], schema_version, model_version)
                cache_state = "ok"
            except CacheUnavailable:
                cache_state = "down"
        return {"status": "ok", "model_version": model_version, "schema_version": schema_version,
                "backend": getattr(backend, "name", "none") if backend is not None else "down", "cache": cache_state}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    return app


def resolve_model(model: str, cache) -> Path:
    """`--model DIR`, or `active`: the model the cache's last promotion names."""
    if model != "active":
        return Path(model)
    record = cache.active() if cache is not None else None
    if not record:
        raise ValueError("--model active: the cache records no promotion (run `querytune cache promote --model DIR` first)")
    return Path(record["model_dir"])
