"""The parse cache: exact-match lookups of labeled queries, embedded (SQLite) or shared by replicas (Redis).

    querytune cache load runs/labels --cache sqlite:///runs/cache.db
    querytune cache stats --cache redis://127.0.0.1:6379/0

A key is (schema version, model version, normalised query): exact match only, and nothing of the request's
context (user city, time) is ever part of a cached parse; context is applied at search time. Entries of several
model versions live side by side. The *active* version is the one served; `promote` makes another version active
(after `cache warm` has labeled the head of the log with it, so a promotion does not turn traffic into misses) and
`rollback` returns to the previous one. Both are one command.

URLs: `sqlite:///relative/path.db`, `sqlite:////absolute/path.db` (WAL journal, safe for several readers and one
writer at a time) and `redis://[:password@]host:port/db`. In Redis, entries expire after `ENTRY_TTL_S` unless
rewritten and promotions never do, so a `volatile-lru` memory policy can evict entries but never the promotion history.

Any failure of the store (unreachable, hung, a write refused: NOREPLICAS, MISCONF, READONLY, a SQLite lock) raises
`CacheUnavailable` naming the store; the server (`querytune.serving.serving_cache`) goes on without it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol
from urllib.parse import urlparse

PREFIX = "qt"  # Redis key prefix
ENTRY_TTL_S = 30 * 24 * 3600  # Redis entries; promotions carry no TTL (see the module doc)


@dataclass(frozen=True)
class Entry:
    parse: dict[str, Any] | None
    valid: bool
    confidence: float
    model_version: str


class CacheUnavailable(RuntimeError):
    """The cache's store failed (down, hung, a write refused or locked): callers go on without it."""


class Cache(Protocol):
    url: str

    def get_many(self, queries: list[str], schema_version: str, model_version: str) -> list[Entry | None]: ...
    def put_many(self, items: Iterable[tuple[str, Entry]], schema_version: str) -> int: ...
    def stats(self) -> dict[str, Any]: ...
    def active(self) -> dict[str, Any] | None: ...
    def promote(self, model_version: str, model_dir: str, schema_version: str) -> dict[str, Any]: ...
    def rollback(self) -> dict[str, Any]: ...


def _entry_json(e: Entry) -> str:
    return json.dumps(
        {"parse": e.parse, "valid": e.valid, "confidence": round(e.confidence, 6), "model_version": e.model_version},
        ensure_ascii=False,
        sort_keys=True,
    )


def _entry(s: str | bytes) -> Entry:
    d = json.loads(s)
    return Entry(d["parse"], d["valid"], d["confidence"], d["model_version"])


class SQLiteCache:
    """One table of entries and one of promotions, in a WAL-journaled file. `busy_timeout_s`: how long a write waits
    for another writer's lock (the server keeps it short: a `cache warm` in progress must not hold a request)."""

    def __init__(self, path: str | Path, url: str | None = None, busy_timeout_s: float = 30.0, create: bool = True):
        self.path, self.url, self.busy_timeout_s = Path(path), url or f"sqlite:///{path}", busy_timeout_s
        if not create and not self.path.is_file():
            raise FileNotFoundError(
                f"cache {self.url}: no such file {self.path} (check the path; `cache load` creates one)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        try:
            db = self._db()
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS entries (schema_version TEXT, model_version TEXT, query TEXT, value TEXT, "
                "PRIMARY KEY (schema_version, model_version, query)) WITHOUT ROWID"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS promotions "
                "(at REAL, model_version TEXT, model_dir TEXT, schema_version TEXT)"
            )
        except sqlite3.DatabaseError as e:  # not a database, or a torn one: say which file, no traceback
            raise ValueError(f"cache {self.url}: {self.path} is not a usable SQLite database ({e})") from None

    def _db(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 connections may not cross threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def _run(self, fn):
        try:
            return fn(self._db())
        except sqlite3.Error as e:
            raise CacheUnavailable(f"{self.url}: {e}") from e

    def get_many(self, queries, schema_version, model_version):
        if not queries:
            return []

        def read(db):
            found = {}
            for start in range(0, len(queries), 500):
                chunk = queries[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for q, v in db.execute(
                    "SELECT query, value FROM entries WHERE schema_version=? AND model_version=? "
                    f"AND query IN ({marks})",
                    [schema_version, model_version, *chunk],
                ):
                    found[q] = _entry(v)
            return [found.get(q) for q in queries]

        return self._run(read)

    def put_many(self, items, schema_version):
        rows = [(schema_version, e.model_version, q, _entry_json(e)) for q, e in items]

        def write(db):
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?)", rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return len(rows)

        return self._run(write)

    def stats(self):
        per = self._run(
            lambda db: db.execute(
                "SELECT schema_version, model_version, COUNT(*) FROM entries GROUP BY 1, 2 ORDER BY 3 DESC"
            ).fetchall()
        )
        return {
            "url": self.url,
            "entries": sum(n for *_, n in per),
            "bytes": self.path.stat().st_size,
            "versions": [{"schema_version": s, "model_version": m, "entries": n} for s, m, n in per],
            "active": self.active(),
            "promotions": len(self._history()),
        }

    def _history(self) -> list[dict[str, Any]]:
        rows = self._run(
            lambda db: db.execute(
                "SELECT at, model_version, model_dir, schema_version FROM promotions ORDER BY rowid"
            ).fetchall()
        )
        return [{"at": a, "model_version": m, "model_dir": d, "schema_version": s} for a, m, d, s in rows]

    def active(self):
        history = self._history()
        return history[-1] if history else None

    def promote(self, model_version, model_dir, schema_version):
        self._run(
            lambda db: db.execute(
                "INSERT INTO promotions VALUES (?, ?, ?, ?)", (time.time(), model_version, model_dir, schema_version)
            )
        )
        return self.active()

    def rollback(self):
        history = self._history()
        if len(history) < 2:
            raise ValueError(f"{self.url}: nothing to roll back to ({len(history)} promotion(s) recorded)")
        self._run(lambda db: db.execute("DELETE FROM promotions WHERE rowid = (SELECT MAX(rowid) FROM promotions)"))
        return self.active()


class RedisCache:
    """Entries as plain keys `qt:<schema>:<model>:<query>` (MGET / pipelined SET); promotions as a list. A store that
    cannot be reached raises `CacheUnavailable`."""

    def __init__(self, url: str, timeout: float = 0.5, ttl_s: int | None = ENTRY_TTL_S):
        import redis

        self.url, self.ttl_s = _redact(url), ttl_s
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def _call(self, fn, *args):
        import redis

        try:
            return fn(*args)
        except redis.RedisError as e:  # down, hung, or a write refused (NOREPLICAS, MISCONF, READONLY, OOM, NOAUTH)
            raise CacheUnavailable(f"{self.url}: {type(e).__name__}: {e}") from e

    @staticmethod
    def key(schema_version: str, model_version: str, query: str) -> str:
        return f"{PREFIX}:{schema_version}:{model_version}:{query}"

    def get_many(self, queries, schema_version, model_version):
        if not queries:
            return []
        values = self._call(self.client.mget, [self.key(schema_version, model_version, q) for q in queries])
        return [_entry(v) if v is not None else None for v in values]

    def put_many(self, items, schema_version):
        n = 0
        pipe = self.client.pipeline(transaction=False)
        for q, e in items:
            pipe.set(self.key(schema_version, e.model_version, q), _entry_json(e), ex=self.ttl_s)
            n += 1
            if n % 1000 == 0:
                self._call(pipe.execute)
        self._call(pipe.execute)
        return n

    def stats(self):
        counts: dict[tuple[str, str], int] = {}
        for k in self._call(lambda: list(self.client.scan_iter(match=f"{PREFIX}:*:*:*", count=1000))):
            _, s, m, _q = k.decode().split(":", 3)
            counts[(s, m)] = counts.get((s, m), 0) + 1
        info = self._call(self.client.info, "memory")
        return {
            "url": self.url,
            "entries": sum(counts.values()),
            "bytes": info.get("used_memory"),
            "versions": [
                {"schema_version": s, "model_version": m, "entries": n}
                for (s, m), n in sorted(counts.items(), key=lambda x: -x[1])
            ],
            "active": self.active(),
            "promotions": self._call(self.client.llen, f"{PREFIX}-promotions"),
        }

    def active(self):
        last = self._call(self.client.lindex, f"{PREFIX}-promotions", -1)
        return json.loads(last) if last else None

    def promote(self, model_version, model_dir, schema_version):
        record = {
            "at": time.time(),
            "model_version": model_version,
            "model_dir": model_dir,
            "schema_version": schema_version,
        }
        self._call(self.client.rpush, f"{PREFIX}-promotions", json.dumps(record))
        return record

    def rollback(self):
        n = self._call(self.client.llen, f"{PREFIX}-promotions")
        if n < 2:
            raise ValueError(f"{self.url}: nothing to roll back to ({n} promotion(s) recorded)")
        self._call(self.client.rpop, f"{PREFIX}-promotions")
        return self.active()


def _redact(url: str) -> str:
    """The URL without its password, for messages and stats.

    >>> _redact("redis://:s3cret@redis:6379/0")
    'redis://:***@redis:6379/0'
    """
    parsed = urlparse(url)
    return url.replace(f":{parsed.password}@", ":***@", 1) if parsed.password else url


def open_cache(url: str, busy_timeout_s: float = 30.0, create: bool = True) -> SQLiteCache | RedisCache:
    """A cache from its URL (see the module doc). `create=False` (read-only commands): a SQLite file that does not
    exist is an error, not a new empty cache.

    >>> import tempfile; c = open_cache(f"sqlite:///{tempfile.mkdtemp()}/c.db")
    >>> c.put_many([("pizza", Entry({"intent": "find_business", "slots": {}}, True, 0.9, "m1"))], "s1")
    1
    >>> [e and e.parse["intent"] for e in c.get_many(["pizza", "sushi"], "s1", "m1")], c.get_many(["pizza"], "s1", "m2")
    (['find_business', None], [None])
    """
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ValueError(f"cache URL {url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db")
        return SQLiteCache(path, url, busy_timeout_s=busy_timeout_s, create=create)
    if parsed.scheme in ("redis", "rediss"):
        return RedisCache(url)
    raise ValueError(f"cache URL {url!r}: use sqlite:///path.db or redis://host:port/db")
