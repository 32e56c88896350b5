"""The server's side of the parse cache: lookups and write-backs that never block the event loop or stop serving.

`ServingCache` wraps a store (`querytune.serving.cache`: SQLite or Redis) for `querytune serve`:
- an in-process copy of the most recently requested entries (LRU, `local_entries`) answers first, so hot queries
  keep hitting while the store is down or hung; entries are immutable per model version, so the copy is never stale;
- store I/O runs on its own small thread pool, and a lookup waits at most `lookup_timeout_s` for it;
- reads and writes each have a circuit breaker: after `failures_to_open` failures in a row the store is skipped for
  `open_s` seconds, then one call tries it again;
- every store error is counted, logged at most once per `open_s`, and shows as `degraded` in `health()` for
  `degraded_s` seconds; none ever reaches the model's batcher;
- answers the store refused (or that the open breaker kept from it) wait, up to `pending_writes` of them, and are
  written once it takes writes again (tried every `retry_s`), so those queries do not stay misses after it recovers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from querytune.serving.cache import CacheUnavailable, Entry

log = logging.getLogger("querytune.serving.cache")


class Breaker:
    """Closed until `failures_to_open` failures in a row; then open (calls skipped) for `open_s`; then one trial
    call."""

    def __init__(self, failures_to_open: int = 3, open_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.failures_to_open, self.open_s, self.clock = failures_to_open, open_s, clock
        self.failures, self.open_until = 0, 0.0
        self.lock = threading.Lock()

    def allow(self) -> bool:
        with self.lock:
            if self.failures < self.failures_to_open:
                return True
            now = self.clock()
            if now < self.open_until:
                return False
            self.open_until = now + self.open_s  # this call is the trial; the others wait for its outcome
            return True

    def ok(self) -> None:
        with self.lock:
            self.failures = 0

    def fail(self) -> None:
        with self.lock:
            self.failures += 1
            if self.failures == self.failures_to_open:
                self.open_until = self.clock() + self.open_s

    @property
    def state(self) -> str:
        return "open" if self.failures >= self.failures_to_open else "closed"


class LocalCopy:
    """A bounded LRU of (model version, query) -> Entry, shared by the event loop and the write-back thread."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            e = self.items.get(key)
            if e is not None:
                self.items.move_to_end(key)
            return e

    def put(self, key, entry: Entry) -> None:
        if self.size <= 0:
            return
        with self.lock:
            self.items[key] = entry
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def __len__(self) -> int:
        return len(self.items)


class ServingCache:
    def __init__(
        self,
        store,
        schema_version: str,
        local_entries: int = 20000,
        lookup_timeout_s: float = 0.25,
        pending_writes: int = 10000,
        retry_s: float = 2.0,
        failures_to_open: int = 3,
        open_s: float = 5.0,
        degraded_s: float = 60.0,
        on_error: Callable[[str], None] | None = None,
    ):
        self.store, self.schema_version = store, schema_version
        self.local = LocalCopy(local_entries)
        self.lookup_timeout_s, self.open_s, self.degraded_s = lookup_timeout_s, open_s, degraded_s
        self.reads, self.writes = Breaker(failures_to_open, open_s), Breaker(failures_to_open, open_s)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cache")
        self.on_error = on_error
        self.errors = {"read": 0, "write": 0}
        self.last_error: tuple[float, str, str] | None = None  # (time, kind, message)
        self.refused: OrderedDict[tuple[str, str], Entry] = OrderedDict()  # (model version, query) -> entry
        self.max_refused, self.retry_s, self.refused_lock = pending_writes, retry_s, threading.Lock()
        self.dropped_writes = self.rewritten = 0
        self._last_logged = 0.0
        self.pending: set[asyncio.Future] = set()
        self.retrier: asyncio.Task | None = None

    def _failed(self, kind: str, message: str) -> None:
        self.errors[kind] += 1
        now = time.monotonic()
        self.last_error = (now, kind, message)
        if now - self._last_logged >= self.open_s:
            self._last_logged = now
            log.warning("cache %s failed (%d so far): %s", kind, self.errors[kind], message)
        if self.on_error:
            self.on_error(kind)

    async def get_many(self, queries: list[str], model_version: str) -> list[Entry | None]:
        found = [self.local.get((model_version, q)) for q in queries]
        todo = [q for q, e in zip(queries, found) if e is None]
        if not todo or self.store is None or not self.reads.allow():
            return found
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self.pool, self.store.get_many, todo, self.schema_version, model_version)
        call.add_done_callback(_retrieve)  # a lookup given up on may still fail later: its error is counted below
        try:
            fetched = await asyncio.wait_for(asyncio.shield(call), self.lookup_timeout_s)
        except Exception as e:  # noqa: BLE001 - CacheUnavailable, a timeout, or a corrupt entry: the model answers instead
            self.reads.fail()
            self._failed("read", str(e) or f"no answer within {self.lookup_timeout_s:g} s")
            return found
        self.reads.ok()
        by_query = dict(zip(todo, fetched))
        for q, e in by_query.items():
            if e is not None:
                self.local.put((model_version, q), e)
        return [e if e is not None else by_query.get(q) for q, e in zip(queries, found)]

    def write_back(self, items: list[tuple[str, Entry]]) -> None:
        """Keep the answers locally at once and write them to the store in the background (never raises)."""
        for q, e in items:
            self.local.put((e.model_version, q), e)
        if not items or self.store is None:
            return
        fut = asyncio.get_running_loop().run_in_executor(self.pool, self._write, items)
        self.pending.add(fut)
        fut.add_done_callback(self.pending.discard)

    def _write(self, items: list[tuple[str, Entry]]) -> bool:
        """Write `items` to the store, or keep them for a later try; True when the store took them."""
        if not self.writes.allow():
            self._keep(items)
            return False
        try:
            self.store.put_many(items, self.schema_version)
            self.writes.ok()
            return True
        except Exception as e:  # noqa: BLE001 - a failed write-back must never reach the batcher
            self.writes.fail()
            self._failed("write", str(e) if isinstance(e, CacheUnavailable) else f"{type(e).__name__}: {e}")
            self._keep(items)
            return False

    def _keep(self, items: list[tuple[str, Entry]]) -> None:
        with self.refused_lock:
            for q, e in items:
                self.refused[(e.model_version, q)] = e
            while len(self.refused) > self.max_refused:
                self.refused.popitem(last=False)
                self.dropped_writes += 1

    def retry_refused(self) -> int:
        """One try to write the answers the store refused (on the cache's pool); how many it took."""
        with self.refused_lock:
            items = [(q, self.refused.pop((v, q))) for v, q in list(itertools.islice(self.refused, 1000))]
        if not items or not self._write(items):
            return 0
        self.rewritten += len(items)
        return len(items)

    def start(self) -> None:
        """Retry refused writes every `retry_s` while the server runs."""
        self.retrier = asyncio.get_running_loop().create_task(self._retry_loop())

    async def _retry_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.retry_s)
            while self.refused and await loop.run_in_executor(self.pool, self.retry_refused):
                pass

    async def probe(self) -> None:
        """One read of the store through the breaker (for /healthz, so a dead store shows without traffic)."""
        await self.get_many(["\x00healthz"], "\x00probe")

    async def drain(self) -> None:
        """Wait for the background writes in flight (tests, shutdown)."""
        if self.pending:
            await asyncio.gather(*list(self.pending), return_exceptions=True)

    def health(self) -> dict:
        if self.store is None:
            return {"state": "none", "local_entries": len(self.local)}
        recent = self.last_error is not None and time.monotonic() - self.last_error[0] < self.degraded_s
        degraded = recent or self.reads.state == "open" or self.writes.state == "open"
        out = {
            "state": "degraded" if degraded else "ok",
            "reads": self.reads.state,
            "writes": self.writes.state,
            "errors": dict(self.errors),
            "pending_writes": len(self.refused),
            "rewritten": self.rewritten,
            "dropped_writes": self.dropped_writes,
            "local_entries": len(self.local),
        }
        if recent:
            out["last_error"] = f"{self.last_error[1]}: {self.last_error[2]}"
        return out

    def close(self) -> None:
        if self.retrier:
            self.retrier.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: asyncio would log "Future exception was never retrieved"
