"""Serving benchmark: cache hits against a bare endpoint, micro-batched misses against batch 1.

    python eval/bench_serving.py --model runs/demo/sft [--seconds 15] [--queries runs/demo/world/test.jsonl]

(a) Cache hits: `GET /v1/parse` for queries the SQLite cache holds, 64 concurrent connections (wrk), against
    `GET /bench/constant` of the same app (a constant JSON: same middleware, same uvicorn settings, same process).
(b) Misses: 32 concurrent clients, each sending distinct unseen queries, with micro-batching (`--max-miss-batch 32`)
    against the same server with batch 1; no cache writes are hit again (every query is new).
Prints a table and ends with one JSON line of the figures and ratios. Needs `wrk` (Debian package) for (a).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python eval/bench_serving.py` from a checkout

from querytune.testing import free_port  # noqa: E402


def serve_main(args) -> None:
    """Child process: the querytune app plus the bare constant endpoint, one uvicorn worker."""
    import uvicorn
    from fastapi.responses import JSONResponse

    from querytune.backends import load_backend
    from querytune.cache import open_cache
    from querytune.serve import Settings, create_app

    import torch

    torch.set_num_threads(args.threads)
    gate = create_app(load_backend("transformers", args.model), open_cache(args.cache),
                      Settings(max_miss_batch=args.max_miss_batch, batch_window_ms=args.window_ms, miss_deadline_s=600.0), access_log=False)
    app = gate.app  # the FastAPI app behind the gate: the constant endpoint goes through the same gate as /v1/parse
    constant = {"query": "cheap thai", "normalized": "cheap thai", "parse": {"intent": "find_business", "slots": {"cuisine": "thai"}},
                "valid": True, "source": "cache", "model_version": "x", "latency_ms": 0.1}

    @app.get("/bench/constant")
    async def bench_constant():
        return JSONResponse(constant)

    uvicorn.run(gate, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def start_server(model: str, cache: str, max_miss_batch: int, window_ms: float, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--model", model, "--cache", cache, "--port", str(port),
                             "--max-miss-batch", str(max_miss_batch), "--window-ms", str(window_ms), "--threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def wrk(url: str, seconds: int, connections: int, lua: str | None = None) -> dict:
    cmd = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency", url]
    if lua:
        cmd[1:1] = ["-s", lua]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": ms("50"), "p99_ms": ms("99"),
            "non_2xx": int(errors.group(1)) if errors else 0}


async def miss_load(base: str, queries: list[str], clients: int) -> dict:
    """`clients` concurrent clients, each sending its share of `queries` one at a time; every query is a miss."""
    import httpx

    latencies: list[float] = []
    sources: dict[str, int] = {}

    async def client(share: list[str], http: httpx.AsyncClient) -> None:
        for q in share:
            t0 = time.perf_counter()
            r = await http.get(f"{base}/v1/parse", params={"q": q}, timeout=600)
            latencies.append(time.perf_counter() - t0)
            src = r.json().get("source", str(r.status_code))
            sources[src] = sources.get(src, 0) + 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(queries[i::clients], http) for i in range(clients)))
        seconds = time.perf_counter() - t0
    latencies.sort()
    return {"queries_per_s": round(len(queries) / seconds, 2), "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1), "sources": sources, "n": len(queries)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder (the quick-preset SFT model)")
    ap.add_argument("--queries", default=None, help="JSONL with a `text` field (default: the world test set next to the model's runs)")
    ap.add_argument("--seconds", type=int, default=15, help="duration of each wrk run")
    ap.add_argument("--misses", type=int, default=192, help="distinct unseen queries per miss run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-miss-batch", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--window-ms", type=float, default=20.0, help="micro-batching window of the batched server")
    args = ap.parse_args()
    if args.serve:
        return serve_main(args)
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")
    from querytune.backends import TransformersBackend
    from querytune.cache import Entry, open_cache
    from querytune.label import check_query

    texts = [json.loads(line)["text"] for line in open(args.queries or ROOT / "runs/s0/world/test.jsonl", encoding="utf-8")]
    norms = list(dict.fromkeys(n for n, _ in map(check_query, texts) if n))
    hits, misses = norms[:64], norms[64:64 + 2 * args.misses]
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    cache_url = f"sqlite:///{work}/cache.db"
    backend = TransformersBackend(args.model)
    preds = backend.parse(hits)
    open_cache(cache_url).put_many([(q, Entry(p.parse, p.valid, p.confidence, backend.model_version)) for q, p in zip(hits, preds)], backend.schema_version)
    del backend
    lua = work / "hits.lua"
    lua.write_text("local qs = {" + ",".join(json.dumps(q) for q in hits) + "}\nlocal i = 0\n"
                   "request = function()\n  i = i % #qs + 1\n  return wrk.format('GET', '/v1/parse?q=' .. qs[i]:gsub(' ', '%%20'))\nend\n")
    results: dict = {}
    proc, base = start_server(args.model, cache_url, 32, args.window_ms, args.threads)
    try:
        wrk(f"{base}/bench/constant", 3, 64)  # warm-up
        results["bare"] = wrk(f"{base}/bench/constant", args.seconds, 64)
        results["hits"] = wrk(f"{base}/v1/parse", args.seconds, 64, str(lua))
        results["misses_batched"] = asyncio.run(miss_load(base, misses[: args.misses], 32))
    finally:
        proc.kill()
        proc.wait()
    proc, base = start_server(args.model, cache_url, 1, 0.0, args.threads)
    try:
        results["misses_batch1"] = asyncio.run(miss_load(base, misses[args.misses: 2 * args.misses], 32))
    finally:
        proc.kill()
        proc.wait()
    print(f"{'run':<16}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, r in results.items():
        print(f"{name:<16}{r.get('requests_per_s', r.get('queries_per_s')):>10.1f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}")
    summary = {"hit_rps": results["hits"]["requests_per_s"], "bare_rps": results["bare"]["requests_per_s"],
               "hit_vs_bare": round(results["hits"]["requests_per_s"] / results["bare"]["requests_per_s"], 3),
               "hit_p50_ms": results["hits"]["p50_ms"], "hit_p99_ms": results["hits"]["p99_ms"],
               "miss_qps_batched": results["misses_batched"]["queries_per_s"], "miss_qps_batch1": results["misses_batch1"]["queries_per_s"],
               "miss_batched_vs_batch1": round(results["misses_batched"]["queries_per_s"] / results["misses_batch1"]["queries_per_s"], 2),
               "hit_non_2xx": results["hits"]["non_2xx"], "miss_sources": results["misses_batched"]["sources"], "cpu_cores": os.cpu_count()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
