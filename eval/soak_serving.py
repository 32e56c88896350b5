"""Soak the server through its cache store's failures: Redis killed, restarted, hung, refusing writes.

    python eval/soak_serving.py [--minutes 10] [--clients 16] [--cached 3000] [--out runs/soak]

Builds a world (or takes `--world`), a tiny in-process model (or `--model`), starts a real redis-server (append-only
file, so a restart after kill -9 keeps its entries) and `querytune serve --cache redis://...`, warms the cache with
the log's `--cached` most typed queries (`querytune cache warm`), then replays the log's traffic with `--clients`
concurrent clients through six phases of equal length:

    normal -> redis killed (kill -9) -> restarted -> hung (SIGSTOP) -> resumed, writes refused (min-replicas-to-write:
    NOREPLICAS on every write-back) -> normal again

A *hit* is a request for a query the cache held; it fails when it is answered by the fallback or any 5xx. A miss
in the writes-refused phase must still be answered by the model. Writes `<out>/soak.json` and prints a table per
phase and one JSON line; exits 1 when a hit failed or a miss went unanswered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/soak_serving.py` from a checkout

from querytune.testing import free_port, rss_mb, start_server, tiny_base, tiny_model  # noqa: E402

PHASES = ["normal", "redis_killed", "redis_restarted", "redis_hung", "writes_refused", "recovered"]


def wait_for(check, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise SystemExit(f"soak: {what} did not come up within {seconds:g} s")


class Redis:
    """A real redis-server on loopback with an append-only file that survives kill -9."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.proc = folder, port, None
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("soak: redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        wait_for(lambda: redis.Redis(port=self.port).ping(), 20, "redis-server")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait()

    def config(self, key: str, value: str) -> None:
        import redis

        redis.Redis(port=self.port).config_set(key, value)


async def replay(url: str, traffic: list[str], cached: set[str], clients: int, seconds: float, phase: str) -> dict:
    import httpx

    counts: Counter[str] = Counter()
    latencies: list[float] = []
    failed_examples: list[dict] = []
    stop = time.time() + seconds
    rng = random.Random(phase)

    async def client(http: httpx.AsyncClient) -> None:
        while time.time() < stop:
            q = rng.choice(traffic)
            t0 = time.perf_counter()
            try:
                r = await http.get(f"{url}/v1/parse", params={"q": q}, timeout=30)
                status, source = (
                    r.status_code,
                    r.json().get("source") if r.status_code < 500 or r.status_code == 503 else None,
                )
            except Exception as e:  # noqa: BLE001 - a dropped connection is a failure like a 5xx
                status, source = 599, type(e).__name__
            latencies.append(time.perf_counter() - t0)
            hit = q in cached
            ok = status < 500 and source not in ("fallback", "unavailable")
            counts[("hit" if hit else "miss") + ("_ok" if ok else "_failed")] += 1
            counts[f"source_{source}"] += 1
            if not ok and len(failed_examples) < 5:
                failed_examples.append({"query": q, "status": status, "source": source})

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    latencies.sort()
    n = len(latencies)
    return {
        "phase": phase,
        "requests": n,
        "requests_per_s": round(n / seconds, 1),
        **dict(counts),
        "p50_ms": round(1000 * latencies[n // 2], 2) if n else None,
        "p99_ms": round(1000 * latencies[int(0.99 * (n - 1))], 2) if n else None,
        "failed_examples": failed_examples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="Length of the whole soak (six equal phases).")
    ap.add_argument("--clients", type=int, default=16, help="Concurrent clients.")
    ap.add_argument(
        "--cached", type=int, default=3000, help="Distinct queries warmed into the cache (the log's most typed)."
    )
    ap.add_argument(
        "--local-cache-entries",
        type=int,
        default=20000,
        help="The server's in-process copy (its --local-cache-entries).",
    )
    ap.add_argument("--world", type=Path, help="World folder whose log is replayed (default: a new 40,000-row world).")
    ap.add_argument("--model", type=Path, help="Model folder to serve (default: a tiny in-process model).")
    ap.add_argument("--out", type=Path, default=Path("runs/soak"), help="Folder for soak.json and the server's log.")
    args = ap.parse_args()

    import pandas as pd

    from querytune.query import check_query
    from querytune.world.make import make_world

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="querytune-soak-"))
    world = args.world
    if world is None:
        world = work / "world"
        print("soak: building a 40,000-row world ...", flush=True)
        make_world(world, seed=0, rows=40_000, per_city=60)
    model = args.model or tiny_model(world / "seed.jsonl", tiny_base(world / "seed.jsonl", work / "base"), work / "sft")
    log = pd.read_parquet(world / "log.parquet", columns=["query"])
    traffic = [
        n for n in (check_query(q)[0] for q in log["query"]) if n
    ]  # by traffic: a query appears as often as typed

    redis = Redis(work, free_port())
    redis.start()
    qt = str(Path(sys.executable).parent / "querytune")
    warm = subprocess.run(
        [
            qt,
            "cache",
            "warm",
            str(world / "log.parquet"),
            "--model",
            str(model),
            "--cache",
            redis.url,
            "--share",
            "1.0",
            "--top",
            str(args.cached),
            "--work",
            str(work / "warm"),
        ],
        capture_output=True,
        text=True,
    )
    if warm.returncode != 0:
        raise SystemExit(f"soak: cache warm failed: {warm.stderr[-2000:]}")
    warmed = json.loads(warm.stdout.strip().splitlines()[-1])
    import redis as redis_py

    from querytune.serving.cache import PREFIX

    cached = {
        k.decode().split(":", 3)[3] for k in redis_py.Redis(port=redis.port).scan_iter(match=f"{PREFIX}:*", count=1000)
    }
    server, url = start_server(
        [
            "--model",
            str(model),
            "--cache",
            redis.url,
            "--deadline",
            "2",
            "--local-cache-entries",
            str(args.local_cache_entries),
            "--no-access-log",
            "--workers",
            "1",
        ],
        args.out / "server.log",
    )  # RSS of the serving process
    import httpx

    idle_mb = rss_mb(server.pid)
    share = sum(q in cached for q in traffic) / len(traffic)
    print(
        f"soak: {len(cached)} cached queries carry {share:.1%} of the log's {len(traffic):,} rows; "
        f"{args.clients} clients, "
        f"{args.minutes:g} min, server RSS {idle_mb:.0f} MB idle",
        flush=True,
    )

    phase_s = 60 * args.minutes / len(PHASES)
    results = []
    try:
        for phase in PHASES:
            if phase == "redis_killed":
                redis.signal(signal.SIGKILL)
            elif phase == "redis_restarted":
                redis.start()
            elif phase == "redis_hung":
                redis.signal(signal.SIGSTOP)
            elif phase == "writes_refused":
                redis.signal(signal.SIGCONT)
                redis.config("min-replicas-to-write", "1")  # every write now answers NOREPLICAS
            elif phase == "recovered":
                redis.config("min-replicas-to-write", "0")
            if phase == "writes_refused":  # misses must still be answered: replay queries the cache never held
                misses = [
                    f"{q} {i}" for i, q in enumerate(random.Random(1).sample(sorted(cached), min(500, len(cached))))
                ]
                r = asyncio.run(
                    replay(url, traffic + misses * (len(traffic) // len(misses)), cached, args.clients, phase_s, phase)
                )
            else:
                r = asyncio.run(replay(url, traffic, cached, args.clients, phase_s, phase))
            r["health"] = httpx.get(f"{url}/healthz", timeout=10).json()
            results.append(r)
            print(
                f"  {phase:16} {r['requests']:7,} requests {r['requests_per_s']:8.1f}/s"
                f"  hits ok {r.get('hit_ok', 0):7,} failed {r.get('hit_failed', 0):3}"
                f"  misses ok {r.get('miss_ok', 0):6,} failed {r.get('miss_failed', 0):3}  p99 {r['p99_ms']} ms  "
                f"health {r['health']['status']}",
                flush=True,
            )
    finally:
        peak_mb = rss_mb(server.pid)
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
        try:
            redis.signal(signal.SIGCONT)
            redis.signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(work, ignore_errors=True)

    failed_hits = sum(r.get("hit_failed", 0) for r in results)
    refused = next(r for r in results if r["phase"] == "writes_refused")
    summary = {
        "cached_queries": len(cached),
        "warmed": warmed["head_queries"],
        "traffic_share_cached": round(share, 4),
        "clients": args.clients,
        "minutes": args.minutes,
        "local_cache_entries": args.local_cache_entries,
        "requests": sum(r["requests"] for r in results),
        "hits": sum(r.get("hit_ok", 0) + r.get("hit_failed", 0) for r in results),
        "failed_hits": failed_hits,
        "misses_answered_after_write_errors": refused.get("miss_ok", 0),
        "misses_failed_after_write_errors": refused.get("miss_failed", 0),
        "server_rss_mb": {"idle": round(idle_mb), "end": round(peak_mb)},
        "phases": results,
        "cpu": _cpu(),
    }
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "phases"}))
    sys.exit(
        1
        if failed_hits
        or summary["misses_failed_after_write_errors"]
        or not summary["misses_answered_after_write_errors"]
        else 0
    )


def _cpu() -> str:
    from querytune.machine import hardware

    return hardware()


if __name__ == "__main__":
    main()
