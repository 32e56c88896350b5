"""The server's settings, one class (`Settings`): `querytune serve`'s options, each also read from its environment
variable `QUERYTUNE_<FIELD>` (how the compose file configures replicas), and what every worker process builds its
app from. The command line's options take their defaults, help and variable names from here (`cli/serve.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from querytune.query import MAX_QUERY_CHARS

ENV_PREFIX = "QUERYTUNE_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    model: str = Field(
        "",
        description="Model folder, or `active`: the model the cache's last `cache promote` names, followed without a "
        "restart.",
    )
    cache_url: str | None = Field(
        None,
        description="Cache URL: sqlite:///path.db or redis://[:password@]host:port/db (default: no cache, every query "
        "a miss).",
    )
    host: str = Field("127.0.0.1", description="Address to bind (loopback by default; 0.0.0.0 exposes it).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    workers: int | None = Field(
        None,
        ge=1,
        description="Server processes sharing the port, each with its own model and in-process cache copy; /metrics "
        "sums them all. Default: the cores this process may use, or 1 with --backend vllm (its engine takes the whole "
        "machine).",
    )
    backend: Literal["transformers", "vllm"] = Field("transformers", description="Model backend for misses.")
    int8: bool = Field(
        False,
        description="--backend transformers: int8 dynamic quantisation of the model's Linear layers but the MLP down "
        "projections: faster misses on CPU, parses within noise of fp32 (eval/RESULTS.md).",
    )
    deadline: float = Field(
        2.0, ge=0.001, description="Seconds a miss may wait for the model; past it the answer is `source: fallback`."
    )
    batch_window_ms: float = Field(
        5.0, ge=0.0, description="How long a miss waits for concurrent misses to share its model call."
    )
    max_miss_batch: int = Field(32, ge=1, description="Most distinct queries in one model call.")
    max_batch: int = Field(64, ge=1, description="Most queries in one POST /v1/parse (more: 413).")
    max_query_chars: int = Field(MAX_QUERY_CHARS, ge=1, description="Longest query accepted (more: 400).")
    max_body_bytes: int = Field(65536, ge=1, description="Largest request body accepted, chunked or not (more: 413).")
    body_timeout: float = Field(
        10.0,
        gt=0.0,
        description="Seconds a client may take to send a request's headers or its body (more: 408 and the connection "
        "closed), so slow or stalled clients cannot hold the server's sockets.",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        description="Open connections a worker serves at once; one past it is answered 503 and closed.",
    )
    local_cache_entries: int = Field(
        20000,
        ge=0,
        description="Entries kept in process (most recently requested first): they answer while the store is down.",
    )
    pending_writes: int = Field(
        10000,
        ge=0,
        description="Answers kept while the cache store refuses writes, written once it takes them again "
        "(more: the oldest are dropped, counted in /healthz).",
    )
    lookup_timeout: float = Field(
        0.25, ge=0.001, description="Seconds a request waits for the cache store before asking the model."
    )
    watch_promotions: float = Field(
        10.0,
        ge=0.0,
        description="With --model active: check the cache's promotion this often (seconds; 0: never).",
    )
    api_key: str | None = Field(
        None, description="Require this key (X-API-Key or Authorization: Bearer) on /v1/ routes."
    )
    fallback_log: str | None = Field(
        None,
        description="Append queries answered by the fallback here (JSONL) for offline labeling; opened at start-up.",
    )
    explore_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of requests in the exploration bucket (chosen by a hash of query, hour and salt), answered "
        "with a parse drawn from the greedy parse and its candidate edits and logged with its probability "
        "(docs/loop.md); never cached. 0: off, every answer as without it.",
    )
    explore_index: str | None = Field(
        None,
        description="Index folder whose catalogue names and embedder propose the bucket's candidate edits (needed "
        "with --explore-share).",
    )
    explore_seed: str | None = Field(
        None,
        description="The labeled file the model was trained from (`train sft --data`): the bucket explores only "
        "requests with a word its texts never write (docs/loop.md); without it, every request in the bucket.",
    )
    explore_salt: str = Field("querytune", description="Salt of the bucket's hash: another salt, another bucket.")
    explore_bucket_s: int = Field(
        3600, ge=1, description="The hash's time bucket (seconds): a query retyped within it gets the same answer."
    )
    explore_log: str | None = Field(
        None,
        description="Append every exploratory answer here (JSONL: query, time, parse, propensity, candidates), "
        "written before the response goes out.",
    )
    access_log: bool = Field(
        True,
        description="One JSON line per request on stderr (request id, status, ms), written every 0.5 s or 1,024 lines.",
    )
    allow_no_key: bool = Field(
        False, description="Serve a non-loopback address without an API key (refused otherwise)."
    )
    # set by `querytune serve` for its workers, not options
    threads: int = Field(0, ge=0, description="Torch threads per worker (0: torch's default).")
    supervisor_pid: int = Field(0, ge=0, description="The process that started the workers (0: none).")

    def env(self) -> dict[str, str | None]:
        """The settings as the environment variables a worker process reads them from (None: unset the variable)."""
        out: dict[str, str | None] = {}
        for name, value in self.model_dump().items():
            key = ENV_PREFIX + name.upper()
            out[key] = None if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        return out


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()
