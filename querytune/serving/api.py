"""The HTTP API's contract: the request and response bodies (pydantic, for validation and the OpenAPI), one
answered query as the routes and the hit path write it (`result`), the error a route raises (`ApiError`), and the
key a request sends (`given_key`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Result(BaseModel):
    """One answered query (the body of GET /v1/parse; POST answers {"results": [Result, ...]})."""

    query: str
    normalized: str
    parse: dict[str, Any] | None = Field(description="{intent, slots}; null for a fallback answer")
    valid: bool
    source: str = Field(
        description="cache, model, fallback (deadline passed: search the raw text) or unavailable (model down)"
    )
    model_version: str
    latency_ms: float
    error: str | None = None
    policy: str | None = Field(
        None, description="`explore` on a request in the exploration bucket (`--explore-share`); absent otherwise"
    )
    propensity: float | None = Field(None, description="Exploration: the probability this parse had of being served")
    candidates: list[dict[str, Any]] | None = Field(
        None,
        description="Exploration: every candidate `parse` with its probability `p` (they sum to one), greedy first",
    )


class Batch(BaseModel):
    """The body of POST /v1/parse."""

    queries: list[str] = Field(description="Search-box queries, at most `--max-batch` of them.")


class BatchResult(BaseModel):
    """The answer to POST /v1/parse: one result per query, in order."""

    results: list[Result]


class ErrorBody(BaseModel):
    """The body of every error response (4xx and 5xx)."""

    error: str = Field(description="What went wrong, in one line")
    code: str = Field(
        description="auth, bad_query, batch, body, timeout, busy, not_found, method, model_down, internal"
    )
    request_id: str
    results: list[Result] | None = Field(
        None, description="POST with the model down: every query's result (hits still answer)"
    )


class Health(BaseModel):
    status: str = Field(
        description="ok; degraded (the cache store failing; answers go on); or warming (503: the model has not yet "
        "answered its warm-up parse)"
    )
    model_version: str
    schema_version: str
    backend: str
    cache: dict[str, Any]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, results: list | None = None):
        self.status, self.code, self.message, self.results = status, code, message, results


def result(
    query: str,
    normalized: str,
    source: str,
    parse: dict | None = None,
    valid: bool = False,
    model_version: str = "",
    error: str | None = None,
    latency_ms: float = 0.0,
) -> dict:
    """One answered query as the API writes it (`Result`, keys in the body's order)."""
    return {
        "query": query,
        "normalized": normalized,
        "parse": parse,
        "valid": valid,
        "source": source,
        "model_version": model_version,
        "error": error,
        "latency_ms": latency_ms,
    }


def given_key(headers: dict[bytes, bytes]) -> bytes:
    """The key a request sends (headers: lower-case name -> first value): X-API-Key, else an `Authorization: Bearer`
    token, read as FastAPI's APIKeyHeader and HTTPBearer read them."""
    key = headers.get(b"x-api-key")
    if key:
        return key
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""
