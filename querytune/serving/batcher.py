"""Misses gathered into backend calls: concurrent misses wait a few milliseconds to share one call (`MissBatcher`),
run on one worker thread; a backend that cannot answer raises `BackendDown`.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor


class BackendDown(RuntimeError):
    """The model backend cannot answer (not loaded, crashed, unreachable)."""


class MissBatcher:
    """Gathers concurrent misses into one backend call, run on one worker thread (the model is not shared across
    threads). `submit` returns a future of the backend's prediction for a normalised query."""

    def __init__(self, backend, window_ms: float, max_batch: int, on_batch=None, on_results=None):
        """`on_batch(n)` after each backend call; `on_results([(query, prediction), ...], model_version)` with every
        answer of a call, including those whose requests have given up waiting (so the cache still gets them), and
        the version of the model that answered (the backend may be swapped by a promotion while a call runs)."""
        self.backend, self.window, self.max_batch, self.on_batch, self.on_results = (
            backend,
            window_ms / 1000,
            max_batch,
            on_batch,
            on_results,
        )
        self.queue: asyncio.Queue | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, query: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((query, fut))
        return fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.window
            while len(items) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            items = [(q, f) for q, f in items if not f.done()]  # callers past their deadline have gone
            if not items:
                continue
            queries = list(dict.fromkeys(q for q, _ in items))
            backend = self.backend
            try:
                preds = await loop.run_in_executor(self.pool, self._parse, backend, queries)
            except Exception as e:  # noqa: BLE001 - any backend failure is reported to each waiting request
                for _, f in items:
                    if not f.done():
                        f.set_exception(BackendDown(f"model backend failed: {type(e).__name__}: {e}"))
                continue
            by_query = dict(zip(queries, preds))
            if self.on_batch:
                self.on_batch(len(queries))
            if self.on_results:
                self.on_results(list(by_query.items()), getattr(backend, "model_version", None))
            for q, f in items:
                if not f.done():
                    f.set_result(by_query[q])

    @staticmethod
    def _parse(backend, queries: list[str]):
        if backend is None:
            raise BackendDown("no model backend is loaded")
        return backend.parse(queries)
