"""`querytune serve`: cache-first parse serving over HTTP (see querytune/serving/serve.py).

    querytune serve --model runs/sft --cache sqlite:///runs/cache.db [--host 127.0.0.1] [--port 8000]
    querytune serve --model active --cache redis://:PASSWORD@redis:6379/0   # follows `cache promote` / `rollback`

Every option is a field of `querytune.serving.settings.Settings`, with its default and help from there, and can be
set by its environment variable (shown in `--help`), which is how the compose file configures replicas. What a
request needs (the model folder, the cache, the fallback log) is opened and checked before the port is bound: a
problem is one line and exit 2, not a worker that crashes and restarts.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import tempfile
from pathlib import Path

import typer
from typer.core import TyperCommand

from querytune.cli.common import Backend, UserError, user_errors
from querytune.serving.settings import Settings, env_name

FIELDS = Settings.model_fields


class PlainHelp(TyperCommand):
    """`serve --help` in click's plain layout: its two dozen options, each with an environment variable, do not fit
    rich's table at 80 columns (names and variables were cut to `--local-cache-en…`, `QUERYTUNE_MAX_CON…`); click
    writes each name whole and wraps the help between words."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "rich_markup_mode": None})


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def option(field: str, *flags: str, **kw):
    """A typer option for a settings field: its default, help and environment variable come from `Settings`."""
    f = FIELDS[field]
    names = flags or (f"--{field.replace('_', '-')}",)
    return typer.Option(f.default, *names, envvar=env_name(field), help=f.description, **kw)


def _old_watch_variable(ctx: typer.Context, value: float) -> float:
    """--watch-promotions from QUERYTUNE_WATCH_S, its variable's old name, when neither the option nor its variable
    is given: the old name still works, said in one line (as runtime/model.py's QUERYTUNE_CACHE)."""
    old = os.environ.get("QUERYTUNE_WATCH_S")
    if old is None or ctx.get_parameter_source("watch_promotions").name != "DEFAULT":  # typer's own click's enum
        return value
    typer.echo(
        "warning: QUERYTUNE_WATCH_S is now QUERYTUNE_WATCH_PROMOTIONS; using QUERYTUNE_WATCH_S's value", err=True
    )
    try:
        return float(old)
    except ValueError:
        raise typer.BadParameter(
            f"QUERYTUNE_WATCH_S: {old!r} is not a number", param_hint="--watch-promotions"
        ) from None


def serve(
    model: str = option("model", "--model"),
    cache_url: str = option("cache_url", "--cache"),
    host: str = option("host"),
    port: int = option("port", min=0, max=65535),
    workers: int = option("workers", min=1, show_default=False),
    backend: Backend = option("backend"),
    int8: bool = option("int8"),
    deadline: float = option("deadline", min=0.001),
    batch_window_ms: float = option("batch_window_ms", min=0.0),
    max_miss_batch: int = option("max_miss_batch", min=1),
    max_batch: int = option("max_batch", min=1),
    max_query_chars: int = option("max_query_chars", min=1),
    max_body_bytes: int = option("max_body_bytes", min=1),
    body_timeout: float = option("body_timeout", min=0.001),
    max_connections: int = option("max_connections", min=1),
    local_cache_entries: int = option("local_cache_entries", min=0),
    pending_writes: int = option("pending_writes", min=0),
    lookup_timeout: float = option("lookup_timeout", min=0.001),
    watch_promotions: float = option("watch_promotions", min=0.0, callback=_old_watch_variable),
    api_key: str = option("api_key"),
    fallback_log: Path = option("fallback_log"),
    explore_share: float = option("explore_share", min=0.0, max=1.0),
    explore_index: Path = option("explore_index"),
    explore_seed: Path = option("explore_seed"),
    explore_salt: str = option("explore_salt"),
    explore_bucket_s: int = option("explore_bucket_s", min=1),
    explore_log: Path = option("explore_log"),
    access_log: bool = option("access_log", "--access-log/--no-access-log"),
    allow_no_key: bool = option("allow_no_key"),
) -> None:
    """Serve GET/POST /v1/parse, /healthz, /metrics and /docs; cache first, misses micro-batched to the model."""
    given = {k: v for k, v in locals().items() if k in FIELDS}
    if not model:
        raise typer.BadParameter("give --model DIR (or `active`), or set QUERYTUNE_MODEL", param_hint="--model")
    given["fallback_log"] = str(fallback_log) if fallback_log else None
    given["explore_index"] = str(explore_index) if explore_index else None
    given["explore_seed"] = str(explore_seed) if explore_seed else None
    given["explore_log"] = str(explore_log) if explore_log else None
    given["workers"] = workers or (1 if backend == "vllm" else usable_cores())
    given["threads"] = max(1, usable_cores() // given["workers"])
    given["supervisor_pid"] = os.getpid()
    with user_errors():
        settings = Settings(**given)
        store, model_dir, preloaded = check_resources(settings)
    following = settings.model == "active" and settings.watch_promotions > 0
    n = settings.workers
    typer.echo(
        f"querytune serving http://{host}:{port} (docs /docs): model {model_dir} on {backend}"
        f"{' (following promotions)' if following else ''}, {n} worker{'s' if n > 1 else ''}; "
        f"cache {store.url if store else 'none'}{f', {local_cache_entries} entries in process' if store else ''}; "
        f"API key {'required' if api_key else 'off'}"
        f"{f'; exploring {explore_share:.1%} of requests' if settings.explore_share > 0 else ''}",
        err=True,
    )
    run(settings, store, preloaded)


def check_resources(settings: Settings):
    """Open what a request will need, once, before the port is bound; a problem is a UserError naming it."""
    from querytune.runtime.model import ModelFolder, ModelFolderError
    from querytune.serving.cache import CacheUnavailable, open_cache
    from querytune.serving.serve import load, resolve_model

    if settings.int8 and settings.backend != "transformers":
        raise UserError("--int8: only the transformers backend quantises")
    if not settings.api_key and settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.allow_no_key:
        raise UserError(
            f"--host {settings.host} without an API key would serve anyone who can reach it: set QUERYTUNE_API_KEY "
            "(or --api-key), or pass --allow-no-key"
        )
    for flag, path in (("--fallback-log", settings.fallback_log), ("--explore-log", settings.explore_log)):
        if path:
            try:
                with open(path, "a", encoding="utf-8"):
                    pass
            except OSError as e:
                raise UserError(f"{flag} {path}: cannot append to it ({e.strerror or e})") from None
    if settings.explore_share > 0:
        if not settings.explore_index:
            raise UserError(
                "--explore-share needs --explore-index INDEX: its catalogue and embedder propose the answers"
            )
        if not (Path(settings.explore_index) / "catalog.parquet").is_file():
            raise UserError(
                f"--explore-index {settings.explore_index}: no catalog.parquet here (run `querytune index build`)"
            )
        if settings.explore_seed and not Path(settings.explore_seed).is_file():
            raise UserError(f"--explore-seed {settings.explore_seed}: file not found")
    store = open_cache(settings.cache_url, busy_timeout_s=0.05) if settings.cache_url else None
    try:
        model_dir = resolve_model(settings.model, store)
    except CacheUnavailable as e:
        raise UserError(f"--model active needs the cache: {e}") from e
    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir}: folder not found")
    try:
        if settings.backend == "vllm":  # its engine starts inside the server's event loop: the folder is read here
            ModelFolder(model_dir)
            backend = None
        else:
            backend = load(settings, model_dir)
    except (ModelFolderError, OSError) as e:
        raise UserError(f"--model {model_dir}: {e}") from None
    if settings.workers > 1:
        backend = None  # each worker loads its own copy; this one only proved the folder loads
    _open_files_for(settings.max_connections)
    return store, model_dir, backend


def _open_files_for(connections: int) -> None:
    """Raise the soft limit on open files so that `--max-connections` sockets fit (within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256  # the model's files, the cache, the log
    if soft != resource.RLIM_INFINITY and soft < want:
        top = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
        if top < want:
            typer.echo(
                f"warning: open files limited to {top}: fewer than --max-connections {connections} fit", err=True
            )


def run(settings: Settings, store, backend) -> None:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from querytune.serving import serve as server
    from querytune.serving.protocol import Protocol

    class Supervisor(Multiprocess):
        def terminate_all(self) -> None:
            # the port stops taking connections now: none waits in the listen queue for workers that are stopping
            for sock in self.sockets:
                sock.close()
            super().terminate_all()

    installed = importlib.util.find_spec
    config = uvicorn.Config(
        "querytune.serving.serve:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level="warning",
        access_log=False,
        loop="uvloop" if installed("uvloop") else "asyncio",
        http=Protocol if installed("httptools") else "h11",
        # a miss in flight at shutdown gets its answer or its fallback
        timeout_graceful_shutdown=int(settings.deadline + Protocol.drain_s + 5),
    )
    Protocol.header_timeout_s, Protocol.max_connections = settings.body_timeout, settings.max_connections
    if settings.workers == 1:  # in this process: the checked store and model serve as they are
        server.PRELOADED.update(settings=settings, store=store, backend=backend)
        uvicorn.Server(config).run()
        return
    # each worker reads the settings from the environment, and writes its metrics into one shared folder
    for key, value in settings.env().items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="querytune-metrics-")
    try:
        Supervisor(config, sockets=[config.bind_socket()]).run()
    finally:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
