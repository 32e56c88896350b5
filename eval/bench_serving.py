"""Serving benchmark: cache hits against bare endpoints, misses at 32 clients against one at a time.

    python eval/bench_serving.py [--workspace workspace] [--seconds 10] [--rounds 2] [--misses 128]

Runs on what `make demo` leaves in the workspace: models/sft (the served model) and world/test.jsonl (the queries).
(a) wrk, 64 connections, every run sending the same requests (`GET /v1/parse?q=` over 64 queries, with the API key):
    (i)   today's bare endpoint, the reference: a FastAPI app with one `@app.middleware("http")` returning a constant
          JSON on plain uvicorn (asyncio loop, h11), one worker: the stack the server ran on before;
    (ii)  a bare pure-ASGI app returning the same JSON on the server's stack (uvloop, httptools, `--workers`);
    (iii) cache hits through `querytune serve` itself on that stack: API key required, access log on (into a file);
          and the same server with `--no-access-log`, to price the log.
    The four take turns for `--rounds` rounds (the machine may be shared); each figure is the mean of its runs. Beside
    requests/s, each run reports the CPU time its server's processes used per request (`server_us`), which other
    work on the machine disturbs less.
(b) misses: `querytune serve --workers 1`, every query distinct and never cached, 32 concurrent clients against one
    client sending one at a time, both after 8 warm-up queries; on the vLLM backend where `.venv-vllm` exists (else transformers, with a note).
Prints a table and ends with one JSON line of every figure and ratio. Needs `wrk` (apt-get install wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python eval/bench_serving.py` from a checkout

from querytune.testing import free_port  # noqa: E402
from querytune.train.sft import cpu_model  # noqa: E402

KEY = "bench-key"
WARM_MISSES = 8  # distinct queries the miss server answers before either miss run is timed
CONSTANT = {"query": "cheap thai", "normalized": "cheap thai", "parse": {"intent": "find_business", "slots": {"cuisine": "thai"}},
            "valid": True, "source": "cache", "model_version": "4bdfb67a09e9", "error": None, "latency_ms": 0.012}
BODY = json.dumps(CONSTANT, separators=(",", ":")).encode()
START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(BODY)).encode()), (b"content-type", b"application/json")]}


async def bare_asgi(scope, receive, send):
    """(ii): the least an ASGI app can do to answer, the floor of the server's stack."""
    if scope["type"] == "http":
        await send(START)
        await send({"type": "http.response.body", "body": BODY})


def today_app():
    """(i): the bare endpoint the hits were compared with before (a FastAPI route behind an HTTP middleware)."""
    import uuid

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.middleware("http")
    async def request_id(request, call_next):
        response = await call_next(request)
        response.headers["x-request-id"] = uuid.uuid4().hex[:16]
        return response

    @app.get("/v1/parse")
    async def constant():
        return JSONResponse(CONSTANT)

    return app


def start(cmd: list[str], ready: str, log: Path, env: dict | None = None, wait_s: float = 900) -> subprocess.Popen:
    """Start a server (its own process group, output into `log`) and wait until `ready` answers 200."""
    import httpx

    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True)
    deadline = time.time() + wait_s
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(ready, headers={"X-API-Key": KEY}, timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"server did not come up: {' '.join(cmd)}; see {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cpu_seconds(group: int) -> float:
    """CPU time (user + system) used so far by the processes of a process group (a server and its workers)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == group:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def wrk(url: str, seconds: int, connections: int, lua: Path, server: subprocess.Popen | None = None) -> dict:
    cpu = cpu_seconds(server.pid) if server else 0.0
    out = subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency", "-s", str(lua), "-H", f"X-API-Key: {KEY}", url],
                         capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(server.pid) - cpu if server else 0.0

    def ms(label: str) -> float:
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": ms("50"), "p99_ms": ms("99"),
            "server_us": round(1e6 * cpu / max(requests, 1), 1), "non_2xx": int(errors.group(1)) if errors else 0}


async def miss_load(base: str, queries: list[str], clients: int) -> dict:
    """`clients` concurrent clients, each sending its share of `queries` one at a time; every query is a miss."""
    import httpx

    latencies: list[float] = []
    sources: dict[str, int] = {}

    async def client(share: list[str], http: httpx.AsyncClient) -> None:
        for q in share:
            t0 = time.perf_counter()
            r = await http.get(f"{base}/v1/parse", params={"q": q}, headers={"X-API-Key": KEY}, timeout=900)
            latencies.append(time.perf_counter() - t0)
            src = r.json().get("source", str(r.status_code))
            sources[src] = sources.get(src, 0) + 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(queries[i::clients], http) for i in range(clients)))
        seconds = time.perf_counter() - t0
    latencies.sort()
    return {"requests_per_s": round(len(queries) / seconds, 2), "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1), "sources": sources, "n": len(queries)}


def mean(runs: list[dict], key: str) -> float:
    return round(sum(r[key] for r in runs) / len(runs), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", type=Path, default=Path("workspace"), help="what `make demo` made (models/sft, world/test.jsonl)")
    ap.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    ap.add_argument("--rounds", type=int, default=2, help="turns of (i)-(iii), each a wrk run per server")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="workers of (ii) and (iii) (default: the cores)")
    ap.add_argument("--misses", type=int, default=128, help="distinct unseen queries at 32 clients (one at a time: a quarter as many)")
    args = ap.parse_args()
    ws = args.workspace.resolve()
    model, test = ws / "models" / "sft", ws / "world" / "test.jsonl"
    for need in (model / "querytune.json", test):
        if not need.is_file():
            sys.exit(f"bench_serving: {need} not found: run `make demo` first (it builds ./workspace), or pass --workspace DIR")
    if not shutil.which("wrk"):
        sys.exit("bench_serving: wrk is not installed: apt-get install wrk (Debian, Ubuntu) or brew install wrk")
    from querytune.runtime.model import ModelFolder
    from querytune.serving.cache import Entry, open_cache
    from querytune.serving.log_input import check_query

    rows = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines()]
    by_norm = {}
    for r in rows:
        norm, _ = check_query(r["text"])
        if norm and norm not in by_norm:
            by_norm[norm] = r
    norms = list(by_norm)
    hits, misses = norms[:64], norms[64:64 + args.misses + args.misses // 4 + WARM_MISSES]
    if len(misses) < args.misses + args.misses // 4 + WARM_MISSES:
        sys.exit(f"bench_serving: {test} has {len(norms)} distinct queries; --misses {args.misses} needs {64 + args.misses + args.misses // 4 + WARM_MISSES}")
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    cache_url = f"sqlite:///{work}/cache.db"
    # the hits' entries: the test set's own parses under the served model's version, as `cache load` would write them
    schema = ModelFolder.open(model).schema
    version = ModelFolder.open(model).version
    open_cache(cache_url).put_many([(q, Entry({"intent": by_norm[q]["intent"], "slots": by_norm[q]["slots"]}, True, 1.0, version))
                                    for q in hits], schema.version)
    lua = work / "hits.lua"
    lua.write_text("local qs = {" + ",".join(json.dumps(quote(q, safe="")) for q in hits) + "}\nlocal i = 0\n"
                   "request = function()\n  i = i % #qs + 1\n  return wrk.format('GET', '/v1/parse?q=' .. qs[i])\nend\n")
    py, qt, w = sys.executable, str(Path(sys.executable).parent / "querytune"), str(args.workers)
    uvicorn = [py, "-m", "uvicorn", "--app-dir", str(ROOT / "eval"), "--log-level", "warning", "--no-access-log"]
    product = [qt, "serve", "--model", str(model), "--cache", cache_url, "--workers", w, "--api-key", KEY]
    servers = {"today_bare": uvicorn + ["bench_serving:today_app", "--factory", "--loop", "asyncio", "--http", "h11", "--workers", "1"],
               "bare_asgi": uvicorn + ["bench_serving:bare_asgi", "--loop", "uvloop", "--http", "httptools", "--workers", w],
               "hits": product, "hits_no_access_log": [*product, "--no-access-log"]}
    urls, procs, runs = {}, {}, {name: [] for name in servers}
    try:
        for name, cmd in servers.items():
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}/v1/parse"
            procs[name] = start([*cmd, "--port", str(port)], f"{urls[name]}?q={quote(hits[0])}", work / f"{name}.log")
            wrk(urls[name], 3, args.connections, lua)  # warm-up: every worker's in-process copy holds the hits after it
        for _ in range(args.rounds):
            for name in servers:
                runs[name].append(wrk(urls[name], args.seconds, args.connections, lua, procs[name]))
                print(name, runs[name][-1], flush=True)
        import httpx

        sources = {httpx.get(urls["hits"], params={"q": q}, headers={"X-API-Key": KEY}).json()["source"] for q in hits}
        for proc in procs.values():
            stop(proc)
        logged = sum(line.startswith('{"ts"') for line in (work / "hits.log").read_text(encoding="utf-8").splitlines())

        vllm_py = ROOT / ".venv-vllm" / "bin" / "python"
        if vllm_py.is_file():
            from querytune.runtime.vllm_backend import vllm_env

            backend, miss_cmd, env = "vllm", [str(vllm_py.parent / "querytune"), "serve", "--backend", "vllm"], vllm_env(ROOT / ".venv-vllm")
        else:
            print("note: no .venv-vllm (make vllm-env): misses run on the transformers backend", flush=True)
            backend, miss_cmd, env = "transformers", [qt, "serve"], {}
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        procs["misses"] = start([*miss_cmd, "--model", str(model), "--cache", f"sqlite:///{work}/misses.db", "--workers", "1", "--deadline", "900",
                                 "--api-key", KEY, "--port", str(port)], f"{base}/healthz", work / "misses.log", env)
        # warm-up, as wrk's for the hits: the engine's first steps (and the grammar's first use) are not a miss's cost
        asyncio.run(miss_load(base, misses[-WARM_MISSES:], 4))
        runs["misses_32"] = [asyncio.run(miss_load(base, misses[: args.misses], 32))]
        runs["misses_1"] = [asyncio.run(miss_load(base, misses[args.misses:-WARM_MISSES], 1))]
        stop(procs["misses"])
    finally:
        for proc in procs.values():
            stop(proc)
    print(f"{'run':<20}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'server us':>11}")
    for name, rs in runs.items():
        us = f"{mean(rs, 'server_us'):>11.1f}" if "server_us" in rs[0] else ""
        print(f"{name:<20}{mean(rs, 'requests_per_s'):>10.1f}{mean(rs, 'p50_ms'):>10.2f}{mean(rs, 'p99_ms'):>10.2f}{us}")
    rps = {name: mean(rs, "requests_per_s") for name, rs in runs.items()}
    us = {name: mean(runs[name], "server_us") for name in servers}
    summary = {"today_bare_rps": rps["today_bare"], "bare_asgi_rps": rps["bare_asgi"], "hit_rps": rps["hits"],
               "hit_no_access_log_rps": rps["hits_no_access_log"], "hit_vs_bare_asgi": round(rps["hits"] / rps["bare_asgi"], 3),
               "bare_asgi_vs_today": round(rps["bare_asgi"] / rps["today_bare"], 2),
               "access_log_cost": round(1 - rps["hits"] / rps["hits_no_access_log"], 3),
               "server_us_per_request": us, "hit_vs_bare_asgi_cpu": round(us["bare_asgi"] / us["hits"], 3),
               "hit_p50_ms": mean(runs["hits"], "p50_ms"), "hit_p99_ms": mean(runs["hits"], "p99_ms"),
               "hit_non_2xx": sum(r["non_2xx"] for r in runs["hits"]), "hit_sources": sorted(sources), "access_log_lines": logged,
               "miss_qps_32": rps["misses_32"], "miss_qps_1": rps["misses_1"], "miss_32_vs_1": round(rps["misses_32"] / rps["misses_1"], 2),
               "miss_sources": runs["misses_32"][0]["sources"], "backend": backend, "workers": args.workers, "connections": args.connections,
               "seconds": args.seconds, "rounds": args.rounds, "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
               "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(summary))
    shutil.rmtree(work, ignore_errors=True)  # the servers' logs (the hits' access log is ~150 bytes a request); kept when a run fails


if __name__ == "__main__":
    main()
