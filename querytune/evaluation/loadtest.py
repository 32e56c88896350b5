"""Replay logged traffic against a running `querytune serve` and report the hit rate, throughput and latency.

    python -m querytune.evaluation.loadtest --url http://127.0.0.1:8000 --log workspace/world/log.parquet \\
        --where period=late [--requests 1000] [--concurrency 16] [--api-key KEY]

Rows are replayed in log order (so the head repeats as it did), `--concurrency` requests in flight. Prints a table
and one JSON line: requests, hit rate (share answered from the cache), sources, requests/s, p50/p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time


async def replay(url: str, queries: list[str], concurrency: int, api_key: str | None) -> dict:
    import httpx

    headers = {"X-API-Key": api_key} if api_key else {}
    sources: dict[str, int] = {}
    latencies: list[float] = []
    it = iter(queries)

    async def worker(http: httpx.AsyncClient) -> None:
        for q in it:
            t0 = time.perf_counter()
            r = await http.get(f"{url}/v1/parse", params={"q": q}, headers=headers, timeout=120)
            latencies.append(time.perf_counter() - t0)
            src = r.json().get("source") if r.headers.get("content-type", "").startswith("application/json") else None
            key = src or f"http_{r.status_code}"
            sources[key] = sources.get(key, 0) + 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "hit_rate": round(sources.get("cache", 0) / n, 4) if n else 0.0,
        "sources": sources,
        "requests_per_s": round(n / seconds, 2),
        "p50_ms": round(1000 * latencies[n // 2], 2) if n else None,
        "p99_ms": round(1000 * latencies[int(0.99 * (n - 1))], 2) if n else None,
        "seconds": round(seconds, 1),
    }


def wait_healthy(url: str, seconds: float) -> None:
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}/healthz did not answer within {seconds:g} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    ap.add_argument("--log", required=True, help="query log (.parquet, .csv or .jsonl) with a query column")
    ap.add_argument("--column", default="query", help="column holding the query text")
    ap.add_argument("--where", default=None, help="only rows whose COLUMN holds VALUE, e.g. period=late")
    ap.add_argument("--requests", type=int, default=1000, help="how many log rows to replay (from the first)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    ap.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    ap.add_argument(
        "--wait", type=float, default=0, help="wait up to this many seconds for the server's /healthz first"
    )
    args = ap.parse_args()
    if args.wait:
        wait_healthy(args.url.rstrip("/"), args.wait)
    from querytune.labeling.log_input import read_rows

    queries = []
    for item in read_rows(args.log, args.column, args.where):
        if not isinstance(item, tuple) and isinstance(item.text, str) and item.text.strip():
            queries.append(item.text)
        if len(queries) >= args.requests:
            break
    result = asyncio.run(replay(args.url.rstrip("/"), queries, args.concurrency, args.api_key))
    print(
        f"replayed {result['requests']:,} requests in {result['seconds']} s: hit rate {result['hit_rate']:.1%}, "
        f"{result['requests_per_s']:.1f} requests/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
        f"sources {result['sources']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
