"""`querytune serve`: cache-first parse serving over HTTP (see querytune/serve.py).

    querytune serve --model runs/sft --cache sqlite:///runs/cache.db [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

from pathlib import Path

import typer

from querytune.cli.common import UserError, user_errors


def serve(
    model: str = typer.Option(..., "--model", help="Model folder, or `active`: the model the cache's last `cache promote` names."),
    cache: str = typer.Option(None, "--cache", help="Cache URL: sqlite:///path.db or redis://host:port/db (default: no cache, every query a miss)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default; 0.0.0.0 exposes it)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    backend: str = typer.Option("transformers", "--backend", help="Model backend for misses: transformers or vllm."),
    deadline: float = typer.Option(2.0, "--deadline", min=0.001, help="Seconds a miss may wait for the model; past it the answer is `source: fallback`."),
    batch_window_ms: float = typer.Option(5.0, "--batch-window-ms", min=0.0, help="How long a miss waits for concurrent misses to share its model call."),
    max_miss_batch: int = typer.Option(32, "--max-miss-batch", min=1, help="Most distinct queries in one model call."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Most queries in one POST /v1/parse (more: 413)."),
    max_query_chars: int = typer.Option(256, "--max-query-chars", min=1, help="Longest query accepted (more: 400)."),
    max_body_bytes: int = typer.Option(65536, "--max-body-bytes", min=1, help="Largest request body accepted (more: 413)."),
    api_key: str = typer.Option(None, "--api-key", envvar="QUERYTUNE_API_KEY", help="Require this key (X-API-Key or Authorization: Bearer) on /v1/ routes."),
    fallback_log: Path = typer.Option(None, "--fallback-log", help="Append queries answered by the fallback here (JSONL) for offline labeling."),
) -> None:
    """Serve GET/POST /v1/parse, /healthz, /metrics and /docs; cache first, misses micro-batched to the model."""
    import uvicorn

    from querytune.backends import BACKENDS, load_backend
    from querytune.cache import CacheUnavailable, open_cache
    from querytune.serve import Settings, create_app, resolve_model

    with user_errors():
        if backend not in BACKENDS:
            raise UserError(f"--backend {backend}: choose from {', '.join(BACKENDS)}")
        store = open_cache(cache) if cache else None
        try:
            model_dir = resolve_model(model, store)
        except CacheUnavailable as e:
            raise UserError(f"--model active needs the cache: {e}") from e
        if not model_dir.is_dir():
            raise UserError(f"--model {model_dir}: folder not found")
        settings = Settings(max_query_chars=max_query_chars, max_batch=max_batch, max_body_bytes=max_body_bytes, miss_deadline_s=deadline,
                            batch_window_ms=batch_window_ms, max_miss_batch=max_miss_batch, api_key=api_key,
                            fallback_log=str(fallback_log) if fallback_log else None)
        app = create_app(load_backend(backend, model_dir), store, settings)
    uvicorn.run(app, host=host, port=port, log_level="warning")
