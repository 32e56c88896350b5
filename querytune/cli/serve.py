"""`querytune serve`: cache-first parse serving over HTTP (see querytune/serving/serve.py).

    querytune serve --model runs/sft --cache sqlite:///runs/cache.db [--host 127.0.0.1] [--port 8000]
    querytune serve --model active --cache redis://:PASSWORD@redis:6379/0   # follows `cache promote` / `rollback`

The options shown with an environment variable in `--help` (QUERYTUNE_MODEL, QUERYTUNE_CACHE_URL, ...) can be set by
it, which is how the compose file configures replicas. One worker process per core by default (`--workers`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import typer

from querytune.cli.common import Backend, UserError, user_errors
from querytune.schema import MAX_QUERY_CHARS


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def serve(
    model: str = typer.Option(
        ...,
        "--model",
        envvar="QUERYTUNE_MODEL",
        help="Model folder, or `active`: the model the cache's last `cache promote` names, followed without a restart.",
    ),
    cache: str = typer.Option(
        None,
        "--cache",
        envvar="QUERYTUNE_CACHE_URL",
        help="Cache URL: sqlite:///path.db or redis://[:password@]host:port/db (default: no cache, every query a miss).",
    ),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        envvar="QUERYTUNE_HOST",
        help="Address to bind (loopback by default; 0.0.0.0 exposes it).",
    ),
    port: int = typer.Option(8000, "--port", envvar="QUERYTUNE_PORT", help="Port to listen on."),
    workers: int = typer.Option(
        None,
        "--workers",
        envvar="QUERYTUNE_WORKERS",
        min=1,
        show_default=False,
        help=f"Server processes sharing the port, each with its own model and in-process cache copy; /metrics "
        f"sums them all. Default: the cores this process may use ({usable_cores()} here), or 1 with --backend "
        f"vllm (its engine takes the whole machine).",
    ),
    backend: Backend = typer.Option(
        "transformers", "--backend", envvar="QUERYTUNE_BACKEND", help="Model backend for misses: transformers or vllm."
    ),
    int8: bool = typer.Option(
        False,
        "--int8",
        envvar="QUERYTUNE_INT8",
        help="--backend transformers: int8 dynamic quantisation of the model's Linear layers but the MLP "
        "down projections: faster misses on CPU, parses within noise of fp32 (eval/RESULTS.md).",
    ),
    deadline: float = typer.Option(
        2.0,
        "--deadline",
        envvar="QUERYTUNE_DEADLINE",
        min=0.001,
        help="Seconds a miss may wait for the model; past it the answer is `source: fallback`.",
    ),
    batch_window_ms: float = typer.Option(
        5.0,
        "--batch-window-ms",
        envvar="QUERYTUNE_BATCH_WINDOW_MS",
        min=0.0,
        help="How long a miss waits for concurrent misses to share its model call.",
    ),
    max_miss_batch: int = typer.Option(
        32,
        "--max-miss-batch",
        envvar="QUERYTUNE_MAX_MISS_BATCH",
        min=1,
        help="Most distinct queries in one model call.",
    ),
    max_batch: int = typer.Option(
        64, "--max-batch", envvar="QUERYTUNE_MAX_BATCH", min=1, help="Most queries in one POST /v1/parse (more: 413)."
    ),
    max_query_chars: int = typer.Option(
        MAX_QUERY_CHARS,
        "--max-query-chars",
        envvar="QUERYTUNE_MAX_QUERY_CHARS",
        min=1,
        help="Longest query accepted (more: 400).",
    ),
    max_body_bytes: int = typer.Option(
        65536,
        "--max-body-bytes",
        envvar="QUERYTUNE_MAX_BODY_BYTES",
        min=1,
        help="Largest request body accepted, chunked or not (more: 413).",
    ),
    local_cache_entries: int = typer.Option(
        20000,
        "--local-cache-entries",
        envvar="QUERYTUNE_LOCAL_CACHE_ENTRIES",
        min=0,
        help="Entries kept in process (most recently requested first): they answer while the store is down.",
    ),
    lookup_timeout: float = typer.Option(
        0.25,
        "--lookup-timeout",
        envvar="QUERYTUNE_LOOKUP_TIMEOUT",
        min=0.001,
        help="Seconds a request waits for the cache store before asking the model.",
    ),
    watch_promotions: float = typer.Option(
        10.0,
        "--watch-promotions",
        envvar="QUERYTUNE_WATCH_S",
        min=0.0,
        help="With --model active: check the cache's promotion this often (seconds; 0: never).",
    ),
    api_key: str = typer.Option(
        None,
        "--api-key",
        envvar="QUERYTUNE_API_KEY",
        help="Require this key (X-API-Key or Authorization: Bearer) on /v1/ routes.",
    ),
    fallback_log: Path = typer.Option(
        None,
        "--fallback-log",
        envvar="QUERYTUNE_FALLBACK_LOG",
        help="Append queries answered by the fallback here (JSONL) for offline labeling.",
    ),
    access_log: bool = typer.Option(
        True,
        "--access-log/--no-access-log",
        envvar="QUERYTUNE_ACCESS_LOG",
        help="One JSON line per request on stderr (request id, status, ms), written every 0.5 s or 1,024 lines.",
    ),
    allow_no_key: bool = typer.Option(
        False,
        "--allow-no-key",
        envvar="QUERYTUNE_ALLOW_NO_KEY",
        help="Serve a non-loopback address without an API key (refused otherwise).",
    ),
) -> None:
    """Serve GET/POST /v1/parse, /healthz, /metrics and /docs; cache first, misses micro-batched to the model."""
    import uvicorn

    from querytune.serving.cache import CacheUnavailable, open_cache
    from querytune.serving.serve import resolve_model
    from querytune.serving.service import Settings

    workers = workers or (1 if backend == "vllm" else usable_cores())
    with user_errors():
        if int8 and backend != "transformers":
            raise UserError("--int8: only the transformers backend quantises")
        if not api_key and host not in ("127.0.0.1", "localhost", "::1") and not allow_no_key:
            raise UserError(
                f"--host {host} without an API key would serve anyone who can reach it: set QUERYTUNE_API_KEY "
                "(or --api-key), or pass --allow-no-key"
            )
        store = open_cache(cache, busy_timeout_s=0.05) if cache else None
        try:
            model_dir = resolve_model(model, store)
        except CacheUnavailable as e:
            raise UserError(f"--model active needs the cache: {e}") from e
        if not model_dir.is_dir():
            raise UserError(f"--model {model_dir}: folder not found")
        settings = Settings(
            max_query_chars=max_query_chars,
            max_batch=max_batch,
            max_body_bytes=max_body_bytes,
            miss_deadline_s=deadline,
            batch_window_ms=batch_window_ms,
            max_miss_batch=max_miss_batch,
            api_key=api_key or None,
            fallback_log=str(fallback_log) if fallback_log else None,
            local_cache_entries=local_cache_entries,
            lookup_timeout_s=lookup_timeout,
        )
    following = model == "active" and watch_promotions > 0
    # what each worker builds its app from (querytune.serving.serve.app_from_env)
    os.environ["QUERYTUNE_SERVE"] = json.dumps(
        {
            "model": model,
            "cache": cache,
            "backend": backend,
            "int8": int8,
            "settings": dataclasses.asdict(settings),
            "watch_s": watch_promotions,
            "access_log": access_log,
            "workers": workers,
            "threads": max(1, usable_cores() // workers),
            "supervisor": os.getpid(),
        }
    )
    typer.echo(
        f"querytune serving http://{host}:{port} (docs /docs): model {model_dir} on {backend}{' (following promotions)' if following else ''}, "
        f"{workers} worker{'s' if workers > 1 else ''}; cache {store.url if store else 'none'}"
        f"{f', {local_cache_entries} entries in process' if store else ''}; API key {'required' if api_key else 'off'}",
        err=True,
    )
    if workers > 1:  # each worker writes its metrics into this folder and a scrape of any worker reads them all
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="querytune-metrics-")
    installed = importlib.util.find_spec
    try:
        uvicorn.run(
            "querytune.serving.serve:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="warning",
            access_log=False,
            loop="uvloop" if installed("uvloop") else "asyncio",
            http="httptools" if installed("httptools") else "h11",
        )
    finally:
        if workers > 1:
            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
