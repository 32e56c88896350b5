"""Cache-first parse serving over HTTP (FastAPI behind a pure-ASGI gate, uvicorn with uvloop and httptools).

    querytune serve --model runs/sft --cache sqlite:///runs/cache.db [--host 127.0.0.1] [--port 8000]
        [--backend transformers|vllm] [--workers N]

One worker process per core by default (`app_from_env` builds each worker's app; each loads its own model; `/metrics`
sums them all through prometheus_client's multiprocess folder). A request's queries are normalised and looked up in the
cache (exact match on normalised query, schema and model version): first an in-process copy of the hot entries, then the
store, off the event loop and behind a circuit breaker (`querytune.serving.serving_cache`). The gate checks the key of
every `/v1/` request once; a `GET /v1/parse?q=` whose query the in-process copy holds it answers without entering
FastAPI (`Service.hit`): the same body, headers, metrics and log line. Misses from concurrent requests are gathered for
a few milliseconds into one backend call (`MissBatcher`), or, for a backend that batches concurrent calls itself (`async
def aparse(texts) -> list[Prediction]`, e.g. vLLM's async engine), sent to it one request at a time; the valid parses
are written back in the background. A miss that the model does not answer within the deadline gets a defined degraded
answer, `source: fallback` (no parse: search the raw text), and is appended to the fallback log for offline labeling.
The store down, hung or refusing writes: hot queries still hit the in-process copy, the rest go to the model, the
answers it refused are written once it is back, and `/healthz` says `degraded`. The model down: hits still answer,
misses get 503 with the reason. With `--model active` the server follows `cache promote` / `rollback` without a restart
(`PromotionWatcher`). With `--explore-share`, a hash-chosen share of requests is answered with a parse drawn from the
greedy parse and its candidate edits, with the probabilities in the body and the exploration log, and never cached
(`querytune.serving.explore`).

Every error, of any status, has one body: `{"error": message, "code": reason, "request_id": id}`. Every response
carries `X-Request-ID`; the access log (`querytune.serving.asgi_gate.AccessLog`, on stderr) writes one JSON line per
request.

Endpoints: `GET /v1/parse?q=...`, `POST /v1/parse {"queries": [...]}`, `/healthz` (503 `warming` until the model has
answered the warm-up parse each worker sends it at start), `/metrics` (Prometheus), `/docs` (Swagger UI, served
locally).

Here: the routes (module level, the `Service` a dependency), the app (`create_app`) and the worker factory
(`app_from_env`); the settings in `querytune.serving.settings`, what the routes share (`Service`, `PromotionWatcher`)
in `querytune.serving.service`, the miss batcher in `querytune.serving.batcher`, the request and response bodies in
`querytune.serving.api`, the connection handling (timeouts, half-close, drain at shutdown) in
`querytune.serving.protocol`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from querytune.serving.api import ApiError, Batch, BatchResult, ErrorBody, Health, Result
from querytune.serving.asgi_gate import AccessLog, Gate
from querytune.serving.protocol import Protocol
from querytune.serving.service import PromotionWatcher, Service
from querytune.serving.settings import Settings

log = logging.getLogger("querytune.serving.serve")

ERRORS = {
    400: "Bad query (empty, too long, control characters, not text) or a malformed body",
    401: "Missing or wrong API key",
    408: "The request's headers or body did not arrive within --body-timeout",
    413: "Too many queries or too large a body",
    503: "The model backend is down (cached queries still answer), or too many connections",
}
# what each route answers besides 200: no 422 (a malformed request is a 400, `invalid`), no 413 for a GET's lone query
RESPONSES = {code: {"model": ErrorBody, "description": text} for code, text in ERRORS.items()}
GET_RESPONSES = {code: r for code, r in RESPONSES.items() if code != 413}

# the key is checked once, by the gate, on the raw headers; these two only document it in the OpenAPI
key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's API key (`--api-key`)")
bearer = HTTPBearer(auto_error=False, description="The same key as a bearer token")


def documented_key(
    _key: str | None = Depends(key_header), _token: HTTPAuthorizationCredentials | None = Depends(bearer)
):
    return None


def get_service(request: Request) -> Service:
    return request.app.state.service


router = APIRouter()


def ok(body) -> Response:  # what the hit path writes too (orjson: a twentieth of json.dumps's time)
    return Response(orjson.dumps(body), media_type="application/json")


@router.get(
    "/v1/parse",
    response_model=Result,
    responses=GET_RESPONSES,
    dependencies=[Depends(documented_key)],
    summary="Parse one query",
)
async def parse_one(
    request: Request,
    q: str = Query(..., description="The search-box query."),
    service: Service = Depends(get_service),
):
    t0 = time.perf_counter()
    results, status = await service.answer([q], request.scope.get("state", {}).get("checked"))
    service.m["latency"].labels("get").observe(time.perf_counter() - t0)
    if status != 200:
        raise ApiError(status, "model_down", results[0]["error"])
    return ok(results[0])


@router.post(
    "/v1/parse",
    response_model=BatchResult,
    responses=RESPONSES,
    dependencies=[Depends(documented_key)],
    summary="Parse a batch of queries",
)
async def parse_many(batch: Batch, service: Service = Depends(get_service)):
    t0 = time.perf_counter()
    if not batch.queries:
        raise ApiError(400, "bad_query", "queries: give at least one")
    if len(batch.queries) > service.settings.max_batch:
        raise ApiError(413, "batch", f"batch of {len(batch.queries)} queries; at most {service.settings.max_batch}")
    results, status = await service.answer(batch.queries)
    service.m["latency"].labels("post").observe(time.perf_counter() - t0)
    if status == 503:
        raise ApiError(
            503, "model_down", "the model backend is down; cached queries are answered in `results`", results
        )
    return ok({"results": results})


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "`warming`: the model has not answered its warm-up parse yet"}},
    summary="Liveness and state (no key needed)",
)
async def healthz(service: Service = Depends(get_service)):
    await service.cache.probe()
    cache_health = service.cache.health()
    b = service.backend
    warm = service.warm_s is not None
    body = {
        "status": "warming" if not warm else "degraded" if cache_health["state"] == "degraded" else "ok",
        "model_version": service.model_version,
        "schema_version": service.schema_version,
        "backend": getattr(b, "name", "none") if b is not None else "down",
        "cache": cache_health,
    }
    return body if warm else JSONResponse(body, status_code=503)  # not ready: a load balancer sends it nothing yet


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(service: Service = Depends(get_service)):
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    service.hit_tally.flush()
    registry = service.registry
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # several workers (`querytune serve` sets it): a scrape sums them all
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")


def reply(request: Request, status: int, code: str, message: str, results: list | None = None) -> JSONResponse:
    request.app.state.service.m["errors"].labels(code).inc()
    body = {"error": message, "code": code, "request_id": request.scope.get("state", {}).get("request_id", "")}
    return JSONResponse(body | ({"results": results} if results is not None else {}), status_code=status)


async def api_error(request: Request, e: ApiError):
    return reply(request, e.status, e.code, e.message, e.results)


async def invalid(request: Request, e: RequestValidationError):
    # the input is never echoed: it may be NaN, 1e999 or a lone surrogate, which JSON cannot carry back
    where = "; ".join(
        f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in e.errors()[:3]
    )
    return reply(request, 400, "bad_query", f"malformed request: {where}")


async def http_error(request: Request, e: HTTPException):
    code = {400: "bad_query", 401: "auth", 404: "not_found", 405: "method"}.get(e.status_code, "http")
    return reply(request, e.status_code, code, str(e.detail))


async def internal(request: Request, e: Exception):
    log.exception("unhandled error in request %s", request.scope.get("state", {}).get("request_id"))
    return reply(request, 500, "internal", f"internal error ({type(e).__name__}); see the server log")


def create_app(
    backend,
    cache,
    settings: Settings | None = None,
    model_version: str | None = None,
    schema_version: str | None = None,
    watch: Callable[[Service], PromotionWatcher] | None = None,
    access: AccessLog | None = None,
    explorer=None,
):
    """The ASGI app. `backend`: a model backend (`querytune.runtime.backends`) or None (every miss gets 503); `cache`: a
    `querytune.serving.cache` store or None; `watch`: builds the promotion watcher (`--model active`); `access`: where
    the access log goes (None: nowhere); `explorer`: the exploration bucket (`querytune.serving.explore.Explorer`)."""
    from fastapi_offline import FastAPIOffline

    settings = settings or Settings()
    service = Service(
        backend,
        cache,
        settings,
        model_version or backend.model_version,
        schema_version or backend.schema_version,
        explorer,
    )
    watcher = watch(service) if watch else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.batcher.start()
        service.cache.start()
        warming = asyncio.get_running_loop().create_task(service.warm_up())  # /healthz says `warming` until it ends
        if watcher:
            watcher.start()
        yield
        warming.cancel()
        if watcher:
            await watcher.stop()
        await service.batcher.stop()
        for call in list(service.calls):
            call.cancel()
        service.hit_tally.flush()
        await service.cache.drain()
        service.cache.close()
        for jsonl in (service.fallback, service.explore_log):
            if jsonl:
                jsonl.close()
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
    app.include_router(router)
    app.openapi = lambda: without_422(app)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal)
    return Gate(
        app,
        settings.max_body_bytes,
        on_refuse=lambda code: service.m["errors"].labels(code).inc(),
        access=access,
        answer=service.hit,
        authorized=service.authorized,
        body_timeout_s=settings.body_timeout,
    )


def without_422(app: FastAPI) -> dict:
    """The app's OpenAPI document without the 422 FastAPI adds to every route that validates its input: this app
    answers such a request 400 (`invalid`), as `RESPONSES` documents."""
    if app.openapi_schema is None:
        doc = type(app).openapi(app)
        for route in doc["paths"].values():
            for operation in route.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema


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


def load(settings: Settings, model_dir: Path):
    """The model backend the settings ask for (a server's vLLM: the async engine, which batches misses itself)."""
    from querytune.runtime.backends import load_backend

    options = {"engine": "async"} if settings.backend == "vllm" else {"int8": True} if settings.int8 else {}
    return load_backend(settings.backend, model_dir, **options)


# `querytune serve` with one worker: the settings, store and backend it checked at start-up, not loaded twice
PRELOADED: dict = {}


def app_from_env():
    """The app of one server worker, built from the settings in the environment (`querytune serve` sets them):
    `uvicorn.run("querytune.serving.serve:app_from_env", factory=True, workers=N)`. Each worker loads its own model
    and keeps its own in-process cache copy."""
    import torch

    from querytune.serving.cache import open_cache

    settings = PRELOADED.get("settings") or Settings()
    if settings.supervisor_pid and (settings.workers or 1) > 1:
        _exit_with(settings.supervisor_pid)
    if settings.threads:
        torch.set_num_threads(settings.threads)  # the workers share the cores
    Protocol.header_timeout_s, Protocol.max_connections = settings.body_timeout, settings.max_connections
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    store = PRELOADED.get("store")
    if store is None and settings.cache_url:
        # a short lock wait: a `cache warm` writing the same SQLite file must not hold requests
        store = open_cache(settings.cache_url, busy_timeout_s=0.05)
    model_dir = resolve_model(settings.model, store)
    watch = None
    if settings.model == "active" and settings.watch_promotions > 0:

        def watch(service: Service) -> PromotionWatcher:
            return PromotionWatcher(
                service, store, lambda path: load(settings, path), settings.watch_promotions, str(model_dir)
            )

    backend = PRELOADED.pop("backend", None) or load(settings, model_dir)
    log.warning("worker %d: model %s version %s on %s", os.getpid(), model_dir, backend.model_version, settings.backend)
    access = AccessLog(sys.stderr.fileno()) if settings.access_log else None
    app = create_app(backend, store, settings, watch=watch, access=access, explorer=explorer_for(settings, backend))
    gc.freeze()  # the model's objects live as long as the worker: no collection need walk them again
    return app


def explorer_for(settings: Settings, backend):
    """The exploration bucket the settings ask for, or None (`--explore-share 0`)."""
    if settings.explore_share <= 0:
        return None
    from querytune.labeled import load_labeled
    from querytune.serving.explore import Explorer

    seed = load_labeled(settings.explore_seed, backend.schema)[0] if settings.explore_seed else []
    return Explorer.for_index(
        backend.schema,
        settings.explore_index,
        settings.explore_share,
        seed_rows=[{"text": r.text, "intent": r.intent, "slots": r.slots} for r in seed],
        salt=settings.explore_salt,
        bucket_s=settings.explore_bucket_s,
    )


def _exit_with(supervisor: int) -> None:
    """A worker ends (SIGTERM) when the process that started it dies, even by SIGKILL: no orphan keeps the port."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != supervisor:  # it died before the line above
        raise SystemExit(f"the server's supervisor (pid {supervisor}) has gone")
