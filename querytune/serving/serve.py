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

Here: the app and its routes (`create_app`) and the worker factory (`app_from_env`); what the routes share (`Service`,
`PromotionWatcher`) in `querytune.serving.service`, the miss batcher in `querytune.serving.batcher`, the request and
response bodies in `querytune.serving.api`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import orjson
from fastapi import Request  # at module level: FastAPI reads the dependency's annotation from here

from querytune.serving.api import (
    ApiError,
    Batch,
    BatchResult,
    ErrorBody,
    Health,
    Result,
)  # Batch too: FastAPI reads the body's annotation from here
from querytune.serving.asgi_gate import AccessLog, Gate
from querytune.serving.service import PromotionWatcher, Service, Settings

log = logging.getLogger("querytune.serving.serve")


def create_app(
    backend,
    cache,
    settings: Settings | None = None,
    model_version: str | None = None,
    schema_version: str | None = None,
    watch: Callable[[Service], PromotionWatcher] | None = None,
    access: AccessLog | None = None,
):
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
    service = Service(
        backend, cache, settings, model_version or backend.model_version, schema_version or backend.schema_version
    )
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

    app = FastAPIOffline(
        title="querytune",
        version="1",
        lifespan=lifespan,
        description="Cache-first query understanding: a query in, its intent + slots parse out.",
    )
    app.state.service = service
    errors = {
        400: "Bad query (empty, too long, control characters, not text) or a malformed body",
        401: "Missing or wrong API key",
        413: "Too many queries or too large a body",
        503: "The model backend is down (cached queries still answer)",
    }
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
        where = "; ".join(
            f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in e.errors()[:3]
        )
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
    async def authorized(
        request: Request,
        _key: str | None = Depends(key_header),
        _token: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> None:
        if not service.authorized(dict(reversed(request.scope["headers"]))):
            raise ApiError(401, "auth", "missing or wrong API key (send X-API-Key or Authorization: Bearer)")

    def ok(body) -> Response:  # what the hit path writes too (orjson: a twentieth of json.dumps's time)
        return Response(orjson.dumps(body), media_type="application/json")

    def timed(endpoint: str, t0: float) -> None:
        m["latency"].labels(endpoint).observe(time.perf_counter() - t0)

    @app.get(
        "/v1/parse",
        response_model=Result,
        responses=responses,
        dependencies=[Depends(authorized)],
        summary="Parse one query",
    )
    async def parse_one(q: str = Query(..., description="The search-box query.")):
        t0 = time.perf_counter()
        results, status = await service.answer([q])
        timed("get", t0)
        if status != 200:
            raise ApiError(status, "model_down", results[0]["error"])
        return ok(results[0])

    @app.post(
        "/v1/parse",
        response_model=BatchResult,
        responses=responses,
        dependencies=[Depends(authorized)],
        summary="Parse a batch of queries",
    )
    async def parse_many(batch: Batch):
        t0 = time.perf_counter()
        if not batch.queries:
            raise ApiError(400, "bad_query", "queries: give at least one")
        if len(batch.queries) > settings.max_batch:
            raise ApiError(413, "batch", f"batch of {len(batch.queries)} queries; at most {settings.max_batch}")
        results, status = await service.answer(batch.queries)
        timed("post", t0)
        if status == 503:
            raise ApiError(
                503, "model_down", "the model backend is down; cached queries are answered in `results`", results
            )
        return ok({"results": results})

    @app.get("/healthz", response_model=Health, summary="Liveness and state (no key needed)")
    async def healthz():
        await service.cache.probe()
        cache_health = service.cache.health()
        b = service.backend
        return {
            "status": "degraded" if cache_health["state"] == "degraded" else "ok",
            "model_version": service.model_version,
            "schema_version": service.schema_version,
            "backend": getattr(b, "name", "none") if b is not None else "down",
            "cache": cache_health,
        }

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        service.hit_tally.flush()
        registry = service.registry
        if (
            "PROMETHEUS_MULTIPROC_DIR" in os.environ
        ):  # several workers (`querytune serve` sets it): a scrape sums them all
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    return Gate(
        app,
        settings.max_body_bytes,
        on_refuse=lambda code: m["errors"].labels(code).inc(),
        access=access,
        answer=service.hit,
    )


def resolve_model(model: str, cache) -> Path:
    """`--model DIR`, or `active`: the model the cache's last promotion names."""
    if model != "active":
        return Path(model)
    record = cache.active() if cache is not None else None
    if not record:
        raise ValueError(
            "--model active: the cache records no promotion (run `querytune cache promote --model DIR` first)"
        )
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
    app = create_app(
        backend,
        store,
        Settings(**o["settings"]),
        watch=watch,
        access=AccessLog(sys.stderr.fileno()) if o["access_log"] else None,
    )
    gc.freeze()  # the model's objects live as long as the worker: no collection need walk them again
    return app


def _exit_with(supervisor: int) -> None:
    """A worker ends (SIGTERM) when the process that started it dies, even by SIGKILL: no orphan keeps the port."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != supervisor:  # it died before the line above
        raise SystemExit(f"the server's supervisor (pid {supervisor}) has gone")
