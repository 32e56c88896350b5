"""Serving benchmark: cache hits against bare endpoints, misses at 32 clients against one at a time.

    python eval/bench_serving.py [--workspace workspace] [--seconds 10] [--rounds 2] [--miss-seconds 30]
                                 [--reference-commit SHA] [--explore-share EPS]

Runs on what `make demo` leaves in the workspace: models/sft (the served model) and world/test.jsonl (the queries).
(a) wrk, 64 connections, every run sending the same requests (`GET /v1/parse?q=` over 64 queries, with the API key):
    (i)   today's bare endpoint, the reference: a FastAPI app with one `@app.middleware("http")` returning a constant
          JSON on plain uvicorn (asyncio loop, h11), one worker: the stack the server ran on before;
    (ii)  a bare pure-ASGI app returning the same JSON on the server's stack (uvloop, httptools, `--workers`);
    (iii) cache hits through `querytune serve` itself on that stack: API key required, access log on (into a file);
          and the same server with `--no-access-log`, to price the log;
    (iv)  the least a hit path written in Python can do on that stack (`least_hit`): the key compared, a body built
          beforehand looked up by the query string, a request id, the latency written in, one access-log line; what
          (iii) could reach with nothing of its own beyond that.
    (v)   with `--reference-commit SHA`: (iii) as that commit's code serves it (a git worktree of it run with this
          environment), the same run's reference for a change to the hit path (the exploration bucket, off, must
          cost nothing: `hit_vs_reference`);
    (vi)  with `--explore-share EPS` (and the workspace's index/ and world/seed.jsonl): (iii) with the exploration
          bucket on, its answers drawn and logged (docs/loop.md): what exploring costs the hit path; with
          `--reference-commit` too, also the reference commit's server with the bucket on (`explore_vs_reference`).
    They take turns for `--rounds` rounds (the machine may be shared); each figure is the mean of its runs. Beside
    requests/s, each run reports the CPU time its server's processes used per request (`server_us`), which other
    work on the machine disturbs less.
(b) misses: `querytune serve --workers 1`, every query distinct and never cached, 32 concurrent clients against one
    client sending one at a time, each for `--miss-seconds` after 8 warm-up queries; the rate counts the answers that
    arrive after the first `--ramp-seconds` and before the end (the steady state, as wrk counts: neither the batch
    filling up nor the requests left in flight at the end); on the vLLM backend where `.venv-vllm` exists (else
    transformers, with a note). Beside them, the engine alone (`--engine-alone`, run in the vLLM environment): vLLM's
    `LLM.generate` on batches of 32 of the same kind of queries against one query at a time, no HTTP: how much of
    the ratio the engine itself allows on this machine; and on batches of 256, what it would allow with more in flight
    than 32 clients can send.
Prints a table and ends with one JSON line of every figure and ratio. Needs `wrk` (apt-get install wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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

from querytune.machine import cpu_model  # noqa: E402
from querytune.testing import free_port  # noqa: E402

KEY = "bench-key"
WARM_MISSES = 8  # distinct queries the miss server answers before either miss run is timed
CONSTANT = {
    "query": "cheap thai",
    "normalized": "cheap thai",
    "parse": {"intent": "find_business", "slots": {"cuisine": "thai"}},
    "valid": True,
    "source": "cache",
    "model_version": "4bdfb67a09e9",
    "error": None,
    "latency_ms": 0.012,
}
BODY = json.dumps(CONSTANT, separators=(",", ":")).encode()
START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-length", str(len(BODY)).encode()), (b"content-type", b"application/json")],
}


async def bare_asgi(scope, receive, send):
    """(ii): the least an ASGI app can do to answer, the floor of the server's stack."""
    if scope["type"] == "http":
        await send(START)
        await send({"type": "http.response.body", "body": BODY})


def least_hit():
    """(iv): the hit path's floor in Python: what any hit must do, with the bodies built beforehand (`BENCH_HIT_BODIES`:
    a JSON file of query string -> body up to latency_ms) and the log lines written every 1,024 requests."""
    import hmac

    bodies = {
        qs.encode(): body.encode() for qs, body in json.loads(Path(os.environ["BENCH_HIT_BODIES"]).read_text()).items()
    }
    key, ids, lines, perf = (
        KEY.encode(),
        map(f"{os.urandom(6).hex()}{{:010x}}".format, itertools.count()),
        [],
        time.perf_counter,
    )

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        t0 = perf()
        headers = dict(scope["headers"])
        if not hmac.compare_digest(headers.get(b"x-api-key", b""), key):
            await send({"type": "http.response.start", "status": 401, "headers": []})
            return await send({"type": "http.response.body", "body": b""})
        rid = next(ids)
        body = b"%s%.3f}" % (bodies[scope["query_string"]], 1000 * (perf() - t0))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(body)).encode()),
                    (b"content-type", b"application/json"),
                    (b"x-request-id", rid.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
        lines.append(
            f'{{"ts": {time.time():.3f}, "request_id": "{rid}", "method": "GET", "path": "/v1/parse", "status": 200, '
            f'"ms": {1000 * (perf() - t0):.3f}, "client": "{scope["client"][0]}"}}\n'.encode()
        )
        if len(lines) >= 1024:
            sys.stderr.buffer.write(b"".join(lines))
            lines.clear()

    return app


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

    proc = subprocess.Popen(
        cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
    )
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
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "1",
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "--latency",
            "-s",
            str(lua),
            "-H",
            f"X-API-Key: {KEY}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = cpu_seconds(server.pid) - cpu if server else 0.0

    def ms(label: str) -> float:
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "server_us": round(1e6 * cpu / max(requests, 1), 1),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


async def miss_load(
    base: str, queries, clients: int, seconds: float, ramp_s: float = 0.0, warm_up: bool = False
) -> dict:
    """`clients` concurrent clients, each sending one query at a time, the next distinct query from `queries` (an
    iterator: every query is sent once, so none is cached), until `seconds` have passed. The rate counts the answers
    that arrive between `ramp_s` and `seconds` (the requests in flight at the end are awaited, not counted).
    `warm_up`: send every query of `queries`, however long it takes."""
    import httpx

    done: list[tuple[float, float]] = []  # (when the answer came, its latency)
    sources: dict[str, int] = {}
    ran_out = []

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < end:
            q = next(queries, None)
            if q is None:
                ran_out.append(time.perf_counter() - t_start)
                return
            t0 = time.perf_counter()
            r = await http.get(f"{base}/v1/parse", params={"q": q}, headers={"X-API-Key": KEY}, timeout=900)
            done.append((time.perf_counter() - t_start, time.perf_counter() - t0))
            src = r.json().get("source", str(r.status_code))
            sources[src] = sources.get(src, 0) + 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as http:
        t_start = time.perf_counter()
        end = t_start + seconds
        await asyncio.gather(*(client(http) for _ in range(clients)))
    if ran_out and not warm_up:
        sys.exit(
            f"bench_serving: the distinct queries ran out after {min(ran_out):.1f} s of {seconds:g}: "
            "lower --miss-seconds"
        )
    counted = sorted(latency for at, latency in done if ramp_s <= at <= seconds)
    if not counted and not warm_up:
        sys.exit(
            f"bench_serving: no answer arrived between {ramp_s:g} s and {seconds:g} s of the miss run: "
            "raise --miss-seconds"
        )
    return {
        "requests_per_s": round(len(counted) / (seconds - ramp_s), 2),
        "p50_ms": round(1000 * counted[len(counted) // 2], 1),
        "p99_ms": round(1000 * counted[int(0.99 * (len(counted) - 1))], 1),
        "sources": sources,
        "counted": len(counted),
        "sent": len(done),
    }


def engine_alone(model: str, queries_file: str) -> None:
    """(b)'s reference without the server, in the vLLM environment: `LLM.generate` on 6 batches of 32 distinct queries
    against 24 queries one at a time, after a warm-up batch, and on 2 batches of 256 (the same queries again: the
    engine caches nothing) for what more in flight than 32 clients can send would give; prints one line
    `ENGINE {json}`."""
    from querytune.runtime.vllm_backend import VLLMBackend

    queries = json.loads(Path(queries_file).read_text(encoding="utf-8"))
    looped = queries * 3  # 512 parses for the batches of 256 (the engine caches nothing, so repeats cost the same)
    backend = VLLMBackend(model, batch_size=256)
    backend.parse(looped[:256])  # warm-up: every batch size up to 256 has run once

    def rate(batches: list[list[str]]) -> float:
        t0 = time.perf_counter()
        for batch in batches:
            backend.parse(batch)
        return sum(map(len, batches)) / (time.perf_counter() - t0)

    batch_qps = rate([queries[i : i + 32] for i in range(32, 224, 32)])
    single_qps = rate([[q] for q in queries[224:248]])
    wide_qps = rate([looped[:256], looped[256:512]])
    print(
        "ENGINE "
        + json.dumps(
            {
                "batch32_qps": round(batch_qps, 2),
                "batch1_qps": round(single_qps, 2),
                "ratio": round(batch_qps / single_qps, 2),
                "batch256_qps": round(wide_qps, 2),
                "batch256_ratio": round(wide_qps / single_qps, 2),
            }
        )
    )


def mean(runs: list[dict], key: str) -> float:
    return round(sum(r[key] for r in runs) / len(runs), 2)


def main() -> None:
    if sys.argv[1:2] == ["--engine-alone"]:  # the bench running itself in the vLLM environment
        return engine_alone(*sys.argv[2:4])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workspace", type=Path, default=Path("workspace"), help="what `make demo` made (models/sft, world/test.jsonl)"
    )
    ap.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    ap.add_argument("--rounds", type=int, default=2, help="turns of (i)-(iii), each a wrk run per server")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="workers of (ii) and (iii) (default: the cores)",
    )
    ap.add_argument(
        "--miss-seconds", type=float, default=30, help="how long each miss run (32 clients, then one) lasts"
    )
    ap.add_argument("--ramp-seconds", type=float, default=5, help="the first seconds of each miss run, not counted")
    ap.add_argument(
        "--reference-commit",
        help="also serve the hits with this commit's code (a git worktree of it), the reference of (v)",
    )
    ap.add_argument(
        "--explore-share", type=float, default=0.0, help="also serve the hits with the bucket at this share, (vi)"
    )
    args = ap.parse_args()
    ws = args.workspace.resolve()
    model, test = ws / "models" / "sft", ws / "world" / "test.jsonl"
    for need in (model / "querytune.json", test):
        if not need.is_file():
            sys.exit(
                f"bench_serving: {need} not found: run `make demo` first (it builds ./workspace), "
                "or pass --workspace DIR"
            )
    if not shutil.which("wrk"):
        sys.exit("bench_serving: wrk is not installed: apt-get install wrk (Debian, Ubuntu) or brew install wrk")
    import orjson

    from querytune.query import check_query
    from querytune.runtime.model import ModelFolder
    from querytune.serving.api import result
    from querytune.serving.cache import Entry, open_cache

    rows = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines()]
    by_norm = {}
    for r in rows:
        norm, _ = check_query(r["text"])
        if norm and norm not in by_norm:
            by_norm[norm] = r
    norms = list(by_norm)
    if args.miss_seconds <= args.ramp_seconds:
        sys.exit(
            f"bench_serving: --miss-seconds {args.miss_seconds:g} must be longer than --ramp-seconds "
            f"{args.ramp_seconds:g}"
        )
    if len(norms) < 64 + WARM_MISSES + 64:
        sys.exit(f"bench_serving: {test} has {len(norms)} distinct queries; it needs at least {64 + WARM_MISSES + 64}")
    hits, misses = norms[:64], norms[64:]
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    cache_url = f"sqlite:///{work}/cache.db"
    # the hits' entries: the test set's own parses under the served model's version, as `cache load` would write them
    folder = ModelFolder.open(model)
    schema, version = folder.schema, folder.version
    entries = {
        q: Entry({"intent": by_norm[q]["intent"], "slots": by_norm[q]["slots"]}, True, 1.0, version) for q in hits
    }
    open_cache(cache_url).put_many(list(entries.items()), schema.version)
    bodies = (
        work / "bodies.json"
    )  # (iv)'s answers: what the server writes for each hit (`result`, orjson), up to latency_ms
    bodies.write_text(
        json.dumps(
            {
                f"q={quote(q, safe='')}": orjson.dumps(result(q, q, "cache", e.parse, e.valid, e.model_version))[
                    : -len(b"0.0}")
                ].decode()
                for q, e in entries.items()
            }
        )
    )
    lua = work / "hits.lua"
    lua.write_text(
        "local qs = {" + ",".join(json.dumps(quote(q, safe="")) for q in hits) + "}\nlocal i = 0\n"
        "request = function()\n  i = i % #qs + 1\n  return wrk.format('GET', '/v1/parse?q=' .. qs[i])\nend\n"
    )
    py, qt, w = sys.executable, str(Path(sys.executable).parent / "querytune"), str(args.workers)
    uvicorn = [py, "-m", "uvicorn", "--app-dir", str(ROOT / "eval"), "--log-level", "warning", "--no-access-log"]
    product = [qt, "serve", "--model", str(model), "--cache", cache_url, "--workers", w, "--api-key", KEY]
    servers = {
        "today_bare": uvicorn
        + ["bench_serving:today_app", "--factory", "--loop", "asyncio", "--http", "h11", "--workers", "1"],
        "bare_asgi": uvicorn + ["bench_serving:bare_asgi", "--loop", "uvloop", "--http", "httptools", "--workers", w],
        "hits": product,
        "hits_no_access_log": [*product, "--no-access-log"],
        "least_hit": uvicorn
        + ["bench_serving:least_hit", "--factory", "--loop", "uvloop", "--http", "httptools", "--workers", w],
    }
    envs = {name: {} for name in servers}
    if args.reference_commit:
        tree = work / "reference"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.reference_commit],
            check=True,
            capture_output=True,
        )
        servers["hits_reference"] = [py, "-m", "querytune.cli", *product[1:]]
        envs["hits_reference"] = {"PYTHONPATH": str(tree)}  # the commit's package before this checkout's
    if args.explore_share > 0:
        servers["hits_explore"] = [
            *product,
            "--explore-share", str(args.explore_share), "--explore-index", str(ws / "index"),
            "--explore-seed", str(ws / "world" / "seed.jsonl"), "--explore-log", str(work / "explore.jsonl"),
        ]  # fmt: skip
        envs["hits_explore"] = {}
        if args.reference_commit:  # and the bucket as the reference commit's code draws it
            servers["hits_explore_reference"] = [py, "-m", "querytune.cli", *servers["hits_explore"][1:]]
            envs["hits_explore_reference"] = envs["hits_reference"]
    urls, procs, runs = {}, {}, {name: [] for name in servers}
    try:
        for name, cmd in servers.items():
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}/v1/parse"
            procs[name] = start(
                [*cmd, "--port", str(port)],
                f"{urls[name]}?q={quote(hits[0], safe='')}",
                work / f"{name}.log",
                {"BENCH_HIT_BODIES": str(bodies), **envs[name]},
            )
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

            backend, miss_cmd, env = (
                "vllm",
                [str(vllm_py.parent / "querytune"), "serve", "--backend", "vllm"],
                vllm_env(ROOT / ".venv-vllm"),
            )
        else:
            print("note: no .venv-vllm (make vllm-env): misses run on the transformers backend", flush=True)
            backend, miss_cmd, env = "transformers", [qt, "serve"], {}
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        procs["misses"] = start(
            [
                *miss_cmd,
                "--model",
                str(model),
                "--cache",
                f"sqlite:///{work}/misses.db",
                "--workers",
                "1",
                "--deadline",
                "900",
                "--api-key",
                KEY,
                "--port",
                str(port),
            ],
            f"{base}/healthz",
            work / "misses.log",
            env,
        )
        # warm-up, as wrk's for the hits: the engine's first steps (and the grammar's first use) are not a miss's cost
        unseen = iter(misses)
        asyncio.run(miss_load(base, itertools.islice(unseen, WARM_MISSES), 4, 900, warm_up=True))
        runs["misses_32"] = [asyncio.run(miss_load(base, unseen, 32, args.miss_seconds, args.ramp_seconds))]
        runs["misses_1"] = [asyncio.run(miss_load(base, unseen, 1, args.miss_seconds, args.ramp_seconds))]
        stop(procs["misses"])
        engine = None
        if backend == "vllm":
            (work / "engine_queries.json").write_text(json.dumps(misses[-248:]), encoding="utf-8")
            out = subprocess.run(
                [str(vllm_py), __file__, "--engine-alone", str(model), str(work / "engine_queries.json")],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            engine = json.loads(next(line for line in out.splitlines() if line.startswith("ENGINE "))[len("ENGINE ") :])
            print("engine alone", engine, flush=True)
    finally:
        for proc in procs.values():
            stop(proc)
    print(f"{'run':<20}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'server us':>11}")
    for name, rs in runs.items():
        us = f"{mean(rs, 'server_us'):>11.1f}" if "server_us" in rs[0] else ""
        print(
            f"{name:<20}{mean(rs, 'requests_per_s'):>10.1f}{mean(rs, 'p50_ms'):>10.2f}{mean(rs, 'p99_ms'):>10.2f}{us}"
        )
    rps = {name: mean(rs, "requests_per_s") for name, rs in runs.items()}
    us = {name: mean(runs[name], "server_us") for name in servers}
    summary = {
        "today_bare_rps": rps["today_bare"],
        "bare_asgi_rps": rps["bare_asgi"],
        "hit_rps": rps["hits"],
        "hit_no_access_log_rps": rps["hits_no_access_log"],
        "hit_vs_bare_asgi": round(rps["hits"] / rps["bare_asgi"], 3),
        "bare_asgi_vs_today": round(rps["bare_asgi"] / rps["today_bare"], 2),
        "access_log_cost": round(1 - rps["hits"] / rps["hits_no_access_log"], 3),
        "server_us_per_request": us,
        "hit_vs_bare_asgi_cpu": round(us["bare_asgi"] / us["hits"], 3),
        "reference_commit": args.reference_commit,
        "hit_vs_reference": round(rps["hits"] / rps["hits_reference"], 3) if "hits_reference" in rps else None,
        "hit_vs_reference_cpu": round(us["hits_reference"] / us["hits"], 3) if "hits_reference" in us else None,
        "hit_rounds_rps": [r["requests_per_s"] for r in runs["hits"]],
        "reference_rounds_rps": [r["requests_per_s"] for r in runs.get("hits_reference", [])],
        "explore_share": args.explore_share,
        "explore_rps": rps.get("hits_explore"),
        "explore_vs_hit": round(rps["hits_explore"] / rps["hits"], 3) if "hits_explore" in rps else None,
        "explore_vs_reference": (
            round(rps["hits_explore"] / rps["hits_explore_reference"], 3) if "hits_explore_reference" in rps else None
        ),
        "hit_p50_ms": mean(runs["hits"], "p50_ms"),
        "hit_p99_ms": mean(runs["hits"], "p99_ms"),
        "hit_non_2xx": sum(r["non_2xx"] for r in runs["hits"]),
        "hit_sources": sorted(sources),
        "access_log_lines": logged,
        "miss_qps_32": rps["misses_32"],
        "miss_qps_1": rps["misses_1"],
        "miss_32_vs_1": round(rps["misses_32"] / rps["misses_1"], 2),
        "engine_alone": engine,
        "miss_sources": runs["misses_32"][0]["sources"],
        "miss_counted": {n: runs[n][0]["counted"] for n in ("misses_32", "misses_1")},
        "miss_seconds": args.miss_seconds,
        "ramp_seconds": args.ramp_seconds,
        "backend": backend,
        "workers": args.workers,
        "connections": args.connections,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(summary))
    if args.reference_commit:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "reference")], check=False)
    shutil.rmtree(
        work, ignore_errors=True
    )  # the servers' logs (the hits' access log is ~150 bytes a request); kept when a run fails


if __name__ == "__main__":
    main()
