"""What the server's routes share: the model (swappable on promotion), the cache, the miss batcher, the exploration
bucket and the metrics (`Service`, with the hit path `hit` and the answer to any query `answer`); the Prometheus flush
of cache hits (`Tally`); the JSONL files of fallback and exploratory answers (`JsonlLog`); and the watcher that follows
promotions (`PromotionWatcher`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from bisect import bisect_left
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote_plus

import orjson

from querytune.query import check_query
from querytune.serving.api import ApiError, given_key, result
from querytune.serving.asgi_gate import Periodic
from querytune.serving.batcher import BackendDown, MissBatcher
from querytune.serving.cache import Entry
from querytune.serving.explore import Explorer
from querytune.serving.serving_cache import ServingCache
from querytune.serving.settings import Settings

log = logging.getLogger("querytune.serving.serve")  # the server's one logger: its lines keep the name they had
WARM_UP_QUERY = "warm-up query"  # any text: its answer is thrown away


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Histogram

    reg = CollectorRegistry()
    return reg, {
        "answers": Counter("querytune_answers", "Parsed queries answered, by source", ["source"], registry=reg),
        "errors": Counter("querytune_errors", "Requests refused or failed, by reason", ["reason"], registry=reg),
        "cache_errors": Counter(
            "querytune_cache_errors", "Cache store reads or writes that failed", ["kind"], registry=reg
        ),
        "latency": Histogram(
            "querytune_request_seconds",
            "Request latency",
            ["endpoint"],
            registry=reg,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        ),
        "batch": Histogram(
            "querytune_miss_batch_size",
            "Distinct queries per backend call",
            registry=reg,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        ),
    }


async def warm(backend, executor=None) -> None:
    """One parse of a throwaway query: a model's first call compiles the grammar and runs its first forward pass
    (seconds on CPU), which the first real query would otherwise pay, past its deadline."""
    if hasattr(backend, "aparse"):
        await backend.aparse([WARM_UP_QUERY])
    elif backend is not None:
        await asyncio.get_running_loop().run_in_executor(executor, backend.parse, [WARM_UP_QUERY])


class Tally(Periodic):
    """Answers counted and timed in plain Python and added to their Prometheus counter and histogram every `every_s`
    seconds and before a scrape: with several workers every Prometheus update is a write to a shared file, which would
    cost the cache hit it records a fifth of its time. A scrape sees other workers' hits up to `every_s` late."""

    def __init__(self, counter, histogram, every_s: float = 0.5):
        self.counter, self.histogram, self.every_s = counter, histogram, every_s
        self.bounds = histogram._upper_bounds  # the histogram's own buckets, +Inf last
        self.counts, self.total = [0] * len(self.bounds), 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.arm()

    def flush(self) -> None:
        self.disarm()
        counts, total, self.counts, self.total = self.counts, self.total, [0] * len(self.bounds), 0.0
        if any(counts):
            # what `observe` does per value, via private attributes: there is no public bulk add, `observe` per hit
            # costs 3-6 us in multiprocess mode (0.3 us here), a custom collector is not summed across workers
            self.counter.inc(sum(counts))
            self.histogram._sum.inc(total)
            for bucket, n in zip(self.histogram._buckets, counts):
                if n:
                    bucket.inc(n)


class Service:
    """What the routes share: the model (swappable on promotion), the cache, the batcher and the metrics."""

    def __init__(
        self,
        backend,
        cache_store,
        settings: Settings,
        model_version: str,
        schema_version: str,
        explorer: Explorer | None = None,
    ):
        self.backend, self.settings = backend, settings
        self.model_version, self.schema_version = model_version, schema_version
        self.registry, self.m = _metrics()
        self.cache = ServingCache(
            cache_store,
            schema_version,
            settings.local_cache_entries,
            settings.lookup_timeout,
            pending_writes=settings.pending_writes,
            on_error=lambda kind: self.m["cache_errors"].labels(kind).inc(),
        )
        self.batcher = MissBatcher(
            backend,
            settings.batch_window_ms,
            settings.max_miss_batch,
            on_batch=self.m["batch"].observe,
            on_results=self.write_answers,
        )
        self.calls: set[asyncio.Task] = set()  # `aparse` calls in flight (they outlive a request past its deadline)
        self.fallback = JsonlLog(settings.fallback_log, "fallback log") if settings.fallback_log else None
        # None with the bucket off: the hit path then pays nothing for it
        self.explorer = explorer if explorer is not None and explorer.share > 0 else None
        self.explore_log = JsonlLog(settings.explore_log, "explore log") if settings.explore_log else None
        self.key = (settings.api_key or "").encode()
        # a hit's query string -> [its body up to latency_ms, the model version, the normalised query] (`_known`)
        self.queries: dict[bytes, list] = {}
        self.hit_tally = Tally(self.m["answers"].labels("cache"), self.m["latency"].labels("get"))
        self.warm_s: float | None = None  # seconds the warm-up parse took; None until it has answered (`warm_up`)

    async def warm_up(self) -> None:
        """The model's first parse, at start-up, before /healthz says ok (`warm`). Not counted, not cached; a failure
        is logged and each miss will report it (503)."""
        t0 = time.perf_counter()
        try:
            await warm(self.backend, self.batcher.pool)  # on the model's own thread, where the misses run
        except Exception as e:  # noqa: BLE001 - any backend failure
            log.error("warm-up parse failed: %s: %s", type(e).__name__, e)
        self.warm_s = time.perf_counter() - t0

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        # constant time: the comparison leaks nothing about the key
        return not self.key or hmac.compare_digest(given_key(headers), self.key)

    def hit(self, scope: dict, headers: dict[bytes, bytes]) -> bytes | None:
        """The body of `GET /v1/parse?q=` when the in-process copy holds the query: what the route would answer,
        counted and timed the same, without entering FastAPI (the gate asks this first, after the key check). None
        for anything else (another route, a second parameter, a bad query, a miss): the app answers it, with the
        query's normalised form left in `scope["state"]["checked"]` so that it is not checked twice."""
        if scope["method"] != "GET" or scope["path"] != "/v1/parse":
            return None
        t0 = time.perf_counter()
        known = self.queries.get(scope["query_string"])
        if known is None or known[1] != self.model_version:
            known = self._known(scope)
            if known is None:
                return None
        if self.explorer is not None and self.explorer.chosen(known[2], time.time()):
            return None  # in the exploration bucket: the app draws its answer
        seconds = time.perf_counter() - t0
        self.hit_tally.add(seconds)
        return b"%s%.3f}" % (known[0], 1000 * seconds)  # the same number as round(ms, 3), at a third of its cost

    def _known(self, scope: dict) -> list | None:
        """[the hit's body up to latency_ms, the model version it was written for, the normalised query] of a query
        string the in-process copy holds, kept for the next hit of it: entries never change within a model version, so
        that body stays right until a promotion changes the version."""
        qs = scope["query_string"]
        if qs[:2] != b"q=" or b"&" in qs:
            return None
        raw = unquote_plus(qs[2:].decode("latin-1"), errors="replace")  # how Starlette reads a query parameter
        checked = check_query(raw, self.settings.max_query_chars)
        scope.setdefault("state", {})["checked"] = (raw, *checked)
        norm = checked[0]
        e = self.cache.local.get((self.model_version, norm)) if norm else None
        if e is None:
            return None
        # latency_ms is the body's last key: all before it is the entry's, written once
        known = [
            orjson.dumps(result(raw, norm, "cache", e.parse, e.valid, e.model_version))[: -len(b"0.0}")],
            self.model_version,
            norm,
        ]
        if len(self.queries) >= self.settings.local_cache_entries:
            self.queries.clear()
        self.queries[qs] = known
        return known

    def submit(self, query: str) -> asyncio.Future:
        """A future of the model's prediction for a normalised query: through the batcher, or for a backend with
        `aparse` (it batches concurrent calls itself), a call of its own."""
        backend = self.backend
        if not hasattr(backend, "aparse"):
            return self.batcher.submit(query)
        fut = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(self._aparse(backend, query, fut))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)
        return fut

    async def _aparse(self, backend, query: str, fut: asyncio.Future) -> None:
        try:
            [prediction] = await backend.aparse([query])
        except Exception as e:  # noqa: BLE001 - any backend failure is reported to the waiting request
            if not fut.done():
                fut.set_exception(BackendDown(f"model backend failed: {type(e).__name__}: {e}"))
            return
        self.m["batch"].observe(1)
        self.write_answers([(query, prediction)], backend.model_version)  # also when the request has given up waiting
        if not fut.done():
            fut.set_result(prediction)

    def swap(self, backend) -> None:
        """Serve another model from now on (a promotion); misses in flight finish with the old one."""
        self.backend = self.batcher.backend = backend
        self.model_version, self.schema_version = backend.model_version, backend.schema_version
        self.cache.schema_version = backend.schema_version

    def write_answers(self, answers: list[tuple[str, Any]], version: str) -> None:
        self.cache.write_back([(q, Entry(p.parse, True, float(p.confidence), version)) for q, p in answers if p.valid])

    async def answer(
        self, raw: list[str], checked: tuple | None = None, at: float | None = None
    ) -> tuple[list[dict], int]:
        """Each query's result in order, and 200, or 503 when a miss found the model down. Bad input: ApiError 400.
        `checked`: (query, normalised, reason) of a query the hit path has already checked; `at`: the request's time
        (epoch seconds, default now), which with the query picks the exploration bucket."""
        t0, s, version = time.perf_counter(), self.settings, self.model_version
        at = time.time() if at is None else at
        norms = []
        for q in raw:
            norm, reason = checked[1:] if checked and checked[0] == q else check_query(q, s.max_query_chars)
            if reason:
                raise ApiError(400, "bad_query", f"query {q[:40]!r}: {reason}")
            norms.append(norm)

        found = await self.cache.get_many(norms, version)
        looked_up = time.perf_counter()
        results: list[dict | None] = [None] * len(raw)
        waits: dict[str, asyncio.Future] = {}
        answered: dict[str, float] = {}  # each miss's answer (or its fallback at the deadline): when it came
        for i, (n, e) in enumerate(zip(norms, found)):
            if e is not None:
                results[i] = result(raw[i], n, "cache", e.parse, e.valid, e.model_version)
            elif n not in waits:
                waits[n] = self.submit(n)
                waits[n].add_done_callback(lambda _, n=n: answered.setdefault(n, time.perf_counter()))
        status, fallbacks = 200, []
        if waits:
            done, _ = await asyncio.wait(waits.values(), timeout=s.deadline)
            for fut in waits.values():
                if fut not in done:
                    fut.cancel()
        for i, n in enumerate(norms):
            if results[i] is not None:
                continue
            fut = waits[n]
            if fut.cancelled():
                results[i] = result(
                    raw[i],
                    n,
                    "fallback",
                    model_version=version,
                    error=f"no model answer within {s.deadline:g} s: search the raw text; queued for offline labeling",
                )
                fallbacks.append(n)
            elif fut.exception() is not None:
                status = 503
                results[i] = result(raw[i], n, "unavailable", model_version=version, error=str(fut.exception()))
            else:
                p = fut.result()
                results[i] = result(raw[i], n, "model", p.parse, bool(p.valid), version, p.error)
        if self.fallback and fallbacks:
            now = time.time()
            self.fallback.append([{"query": q, "at": now} for q in dict.fromkeys(fallbacks)])
        if self.explorer is not None:
            await self._explore(results, norms, at)
        end = time.perf_counter()
        for n, r in zip(norms, results):  # each row's own time: a hit's is the lookup, a miss's until its answer
            r["latency_ms"] = round(1000 * ((looked_up if r["source"] == "cache" else answered.get(n, end)) - t0), 3)
            self.m["answers"].labels(r["source"]).inc()
        return results, status  # type: ignore[return-value]

    async def _explore(self, results: list[dict], norms: list[str], at: float) -> None:
        """Answer the bucket's rows with their draw (`querytune.serving.explore`), logged before the response goes
        out. Only rows with a valid greedy parse explore; the cache keeps the greedy parse."""
        explorer, draws = self.explorer, {}
        rows = [
            i
            for i, (r, n) in enumerate(zip(results, norms))
            if r["source"] in ("cache", "model") and r["valid"] and r["parse"] and explorer.chosen(n, at)
        ]
        if not rows:
            return
        loop = asyncio.get_running_loop()
        for i in rows:
            n = norms[i]
            if n not in draws:  # the proposal embeds the text's free n-grams: off the event loop
                draws[n] = await loop.run_in_executor(
                    self.batcher.pool, explorer.draw, n, results[i]["query"], results[i]["parse"], at
                )
            results[i]["parse"] = draws[n].parse
            results[i].update(draws[n].fields())
        if self.explore_log:
            self.explore_log.append(
                [
                    {
                        "at": at,
                        "query": results[i]["query"],
                        "normalized": norms[i],
                        "model_version": results[i]["model_version"],
                        "parse": results[i]["parse"],
                        "share": explorer.share,
                        "salt": explorer.salt,
                        **draws[norms[i]].fields(),
                    }
                    for i in rows
                ]
            )


class JsonlLog:
    """A JSONL file the server appends to (`--fallback-log`: queries the fallback answered, for offline labeling;
    `--explore-log`: every exploratory answer): opened when the server starts (a path that cannot be written stops it
    there with one line); each append is written and flushed before the response goes out, so a killed server loses
    no row it answered; a write that fails later (a full disk) is logged and counted, never a failed request."""

    def __init__(self, path: str, what: str):
        self.path, self.what, self.lock, self.failed = path, what, threading.Lock(), 0
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the server's life, closed by `close`

    def append(self, rows: list[dict]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        try:
            with self.lock:
                self.file.write(lines)
                self.file.flush()
        except (OSError, ValueError) as e:  # ValueError: the file was closed under us at shutdown
            self.failed += len(rows)
            log.warning("%s %s: %d rows not written (%s)", self.what, self.path, len(rows), e)

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as e:  # what a full disk refuses at the last flush
            log.warning("%s %s: %s", self.what, self.path, e)


class PromotionWatcher:
    """With `--model active`: polls the cache's promotion record and swaps the served model when it changes (a
    promotion or a rollback), loading the new one on a thread while the old one keeps answering."""

    def __init__(
        self, service: Service, store, load: Callable[[Path], Any], every_s: float, current_dir: str | None = None
    ):
        self.service, self.store, self.load, self.every_s = service, store, load, every_s
        self.current = current_dir
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    async def check(self) -> bool:
        """One poll; True when the served model changed."""
        loop = asyncio.get_running_loop()
        try:
            record = await loop.run_in_executor(self.service.cache.pool, self.store.active)
        except Exception as e:  # noqa: BLE001 - the store down: keep serving the current model
            log.warning("promotion check failed: %s", e)
            return False
        if not record or record["model_dir"] == self.current:
            return False
        try:
            backend = await loop.run_in_executor(None, self.load, Path(record["model_dir"]))
            await warm(backend)  # before it serves, on a thread of its own while the old model answers
        except Exception as e:  # noqa: BLE001 - a bad promotion must not take the server down
            log.error(
                "promoted model %s could not be loaded, still serving %s: %s", record["model_dir"], self.current, e
            )
            self.current = record["model_dir"]  # do not retry it every poll; the next promotion is tried
            return False
        self.service.swap(backend)
        log.warning("now serving %s (model version %s)", record["model_dir"], backend.model_version)
        self.current = record["model_dir"]
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            await self.check()
