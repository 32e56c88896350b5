"""Operator's fault probes: what `querytune serve` and `querytune label` do when the disk, the model folder, the cache
store, the clients or the operator misbehave. Each probe must end in a clear answer, never a traceback or a hang.

    python eval/probe_ops.py [--only NAME[,NAME]] [--keep] [--out runs/probe_ops]

Builds the tests' tiny world and model once (querytune.testing, ~15 s), then runs, each in its own temporary folder
and through real `querytune` processes:

 1. fallback_log        --fallback-log in a missing folder / a directory: exit 2, one line naming the option;
                        /dev/full (every write fails): the server still answers 20 misses 200 `source: fallback`.
 2. broken_model_serve  the model folder broken 13 ways (bad / missing querytune.json, schema.yaml, adapter, tokenizer):
                        `serve --workers 2` exits 2 within 90 s with one `error:` line naming the file; port left free.
 3. broken_model_cli    the same 13 folders with `predict` and `label`: exit 2, one line naming the file (26 runs).
 4. label_out           --out an existing file, OUT/labels a file, --out '': exit 2, one line, nothing new in the cwd.
 5. restart_symlink     OUT/labels a link to a folder elsewhere, `label --restart`: no file outside --out deleted.
 6. manifest_rebuild    3,000 queries labeled in shards of 256, manifest.json cut in half, run again: exit 0,
                        labeled_now 0, every label kept.
 7. slowloris           900 connections send half a POST body and stall: a second client's p99 stays under 1 s and
                        all 900 are closed after --body-timeout; half_close: a GET then SHUT_WR still gets its 200.
 8. sigterm             16 keep-alive clients in a loop, SIGTERM to the supervisor: no request written on an open
                        connection goes unanswered.
 9. refused_writes      the cache store refuses writes (SQLite write lock held; Redis NOREPLICAS) while 50 misses are
                        answered: after it recovers all 50 land in the store.
10. long_line           a JSONL log with one 1 GiB line: `label` stays under 1 GB resident, exit 0, 10 rows, one
                        short reject naming the length.
11. redis_stopped       Redis killed and restarted under traffic: no 500, no traceback, no "Future exception was never
                        retrieved" in the server's log.

Prints one table (probe | figure | verdict), writes the rows with their evidence to `<out>/probe_ops.json`, and exits
1 when any probe FAILS. About 7 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/probe_ops.py` from a checkout

from querytune.testing import free_port, start_server, tiny_world_and_model  # noqa: E402

QT = str(Path(sys.executable).parent / "querytune")
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # two cores: keep each process to one thread


@dataclass
class Ctx:
    root: Path  # the run's temporary folder; each probe works in its own folder under it
    model: Path  # the tiny model, built once; probes copy it before they use it
    world: Path
    queries: list[str]  # distinct normalised log queries, shuffled


def row(probe: str, figure: str, ok: bool, evidence: str = "") -> dict:
    return {"probe": probe, "figure": figure, "verdict": "holds" if ok else "FAILS", "evidence": evidence}


def folder(ctx: Ctx, name: str) -> tuple[Path, Path]:
    """(this probe's own temporary folder, its copy of the tiny model)."""
    d = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=ctx.root))
    return d, Path(shutil.copytree(ctx.model, d / "model"))


def cli(args: list[str], timeout: float = 300, cwd: Path | None = None) -> tuple[int | None, str]:
    """(exit code or None when killed at `timeout`, stdout and stderr together) of `querytune ARGS`."""
    p = subprocess.Popen(
        [QT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=ENV, start_new_session=True
    )
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # its own session: the process and any children it started
        out, _ = p.communicate()
        return None, out.decode(errors="replace")


def lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()]


def one_line_error(rc: int | None, out: str, names: list[str]) -> tuple[bool, str]:
    """Exit 2, exactly one line of output naming one of `names`, no traceback. Returns (ok, evidence)."""
    ls = lines(out)
    ok = rc == 2 and "Traceback" not in out and len(ls) == 1 and any(n in ls[0] for n in names)
    first = " | ".join(x.strip()[:200] for x in ls[:3])
    return ok, f"exit {rc if rc is not None else 'none (killed)'}; {len(ls)} line(s); {first}"


def stop(proc: subprocess.Popen, seconds: float = 30) -> int | None:
    """SIGTERM a server and wait; SIGKILL it and its children if it does not end."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
    finally:
        for c in children:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def get(url: str, q: str, timeout: float = 30) -> tuple[int, str | None]:
    """(status, source) of GET /v1/parse?q=...; status 599 when the request itself failed."""
    import httpx

    try:
        r = httpx.get(f"{url}/v1/parse", params={"q": q}, timeout=timeout)
        return r.status_code, r.json().get("source") if r.status_code == 200 else None
    except httpx.HTTPError as e:
        return 599, type(e).__name__


def health(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/healthz", timeout=10).json()


def cache_state(url: str) -> str:
    """/healthz's cache state: `none` when the server runs without the store it was given."""
    return health(url)["cache"].get("state", "?")


IGNORED = "--cache ignored: /healthz says cache state `none`"


def write_log(path: Path, queries: list[str]) -> Path:
    path.write_text("".join(json.dumps({"query": q}) + "\n" for q in queries))
    return path


def label_count(out: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted((out / "labels").glob("part-*.parquet")))


def tail(path: Path, n: int = 3) -> str:
    return " | ".join(lines(path.read_text(errors="replace"))[-n:])[:400] if path.exists() else ""


class Redis:
    """A redis-server on loopback without persistence, in the probe's folder."""

    def __init__(self, d: Path):
        self.dir, self.port, self.proc = d, free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
            + ["--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 20
        while True:
            try:
                if redis.Redis(port=self.port).ping():
                    return
            except redis.RedisError:
                if time.time() > deadline:
                    raise
            time.sleep(0.1)

    def client(self):
        import redis

        return redis.Redis(port=self.port)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------------------------- 1


def fallback_log(ctx: Ctx) -> list[dict]:
    d, model = folder(ctx, "fallback_log")
    rows = []
    base = ["--model", str(model), "--workers", "1", "--deadline", "0.001"]
    for kind, x in (("missing folder", d / "nowhere" / "fallback.jsonl"), ("a directory", d)):
        rc, out = cli(["serve", *base, "--fallback-log", str(x), "--port", str(free_port())], timeout=60)
        ok, ev = one_line_error(rc, out, ["--fallback-log"])
        rows.append(row(f"fallback_log: {kind}", f"exit {rc}", ok, ev))
    log = d / "server.log"
    try:
        server, url = start_server([*base, "--fallback-log", "/dev/full"], log)
    except SystemExit as e:
        return rows + [row("fallback_log: /dev/full", "did not start", False, f"{e}; {tail(log)}")]
    try:
        answers = [get(url, q) for q in ctx.queries[:20]]
    finally:
        stop(server)
    text = log.read_text(errors="replace")
    fallback = sum(a == (200, "fallback") for a in answers)
    s500 = sum(a[0] == 500 for a in answers)
    tracebacks = text.count("Traceback")
    ok = fallback == 20 and s500 == 0 and tracebacks == 0
    rows.append(
        row(
            "fallback_log: /dev/full",
            f"{fallback}/20 fallback, {s500}x500, {tracebacks} tracebacks",
            ok,
            f"answers {dict(Counter(map(str, answers)))}; log: {tail(log)}",
        )
    )
    return rows


# ------------------------------------------------------------------------------------------------------------ 2, 3


def _write(name: str, text: str):
    return name, lambda d: (d / name).write_text(text)


def _delete(name: str):
    return name, lambda d: (d / name).unlink()


def _truncate(name: str, half: bool):
    return name, lambda d: os.truncate(d / name, (d / name).stat().st_size // 2 if half else 0)


BREAKS = {  # kind -> (the file it breaks, how)
    "querytune.json `{`": _write("querytune.json", "{"),
    "querytune.json `[]`": _write("querytune.json", "[]"),
    "querytune.json `null`": _write("querytune.json", "null"),
    "querytune.json `{}`": _write("querytune.json", "{}"),
    "querytune.json deleted": _delete("querytune.json"),
    "schema.yaml not YAML": _write("schema.yaml", ": : ["),
    "schema.yaml deleted": _delete("schema.yaml"),
    "schema.yaml `intents: 5`": _write("schema.yaml", "intents: 5\n"),
    "adapter half": _truncate("adapter_model.safetensors", half=True),
    "adapter zero bytes": _truncate("adapter_model.safetensors", half=False),
    "adapter deleted": _delete("adapter_model.safetensors"),
    "adapter_config.json `{`": _write("adapter_config.json", "{"),
    "tokenizer.json deleted": _delete("tokenizer.json"),
}


def broken_models(ctx: Ctx, d: Path) -> dict[str, tuple[str, Path]]:
    """kind -> (file broken, a copy of the tiny model broken that way)."""
    out = {}
    for i, (kind, (name, breaker)) in enumerate(BREAKS.items()):
        m = Path(shutil.copytree(ctx.model, d / f"broken-{i:02d}"))
        breaker(m)
        out[kind] = (name, m)
    return out


def serve_until_exit(args: list[str], port: int, log: Path, seconds: float = 90) -> tuple[int | None, str, str]:
    """(exit code or None, output, what happened) of `querytune serve ARGS --port PORT`, ended at `seconds` or as
    soon as it answers /healthz (a broken model served is a failure either way)."""
    import httpx
    import psutil

    proc = subprocess.Popen(
        [QT, "serve", *args, "--port", str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV
    )
    deadline, what = time.time() + seconds, "exited"
    while proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                what = "served /healthz"
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            what = f"still running after {seconds:g} s"
            break
        time.sleep(0.3)
    if proc.poll() is None:
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        proc.wait()
        for c in children:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
    return (proc.returncode if what == "exited" else None), log.read_text(errors="replace"), what


def broken_model_serve(ctx: Ctx) -> list[dict]:
    d, _ = folder(ctx, "broken_model_serve")
    holding, bad = 0, []
    for kind, (name, m) in broken_models(ctx, d).items():
        port = free_port()
        rc, out, what = serve_until_exit(["--model", str(m), "--workers", "2"], port, d / f"{m.name}.log")
        time.sleep(0.5)
        still = listening(port)
        ok, ev = one_line_error(rc, out, [name])
        ok = ok and out.lstrip().startswith("error:") and not still
        holding += ok
        if not ok:
            bad.append(f"[{kind}] {what}; {ev}" + ("; port still listening" if still else ""))
    return [row("broken_model_serve", f"{holding}/{len(BREAKS)} kinds hold", holding == len(BREAKS), " || ".join(bad))]


def broken_model_cli(ctx: Ctx) -> list[dict]:
    d, _ = folder(ctx, "broken_model_cli")
    log = write_log(d / "log.jsonl", ctx.queries[:20])
    holding, bad, n = 0, [], 0
    for kind, (name, m) in broken_models(ctx, d).items():
        runs = {
            "predict": ["predict", "--model", str(m), "cheap thai near me"],
            "label": ["label", str(log), "--model", str(m), "--out", str(d / f"out-{m.name}")],
        }
        for cmd, args in runs.items():
            n += 1
            rc, out = cli(args, timeout=120)
            ok, ev = one_line_error(rc, out, [name])
            holding += ok
            if not ok:
                bad.append(f"[{cmd} {kind}] {ev}")
    return [row("broken_model_cli", f"{holding}/{n} runs hold", holding == n, " || ".join(bad))]


# ---------------------------------------------------------------------------------------------------------------- 4


def listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def label_out(ctx: Ctx) -> list[dict]:
    d, model = folder(ctx, "label_out")
    log = write_log(d / "log.jsonl", ctx.queries[:20])
    rows = []
    f = d / "a-file"
    f.write_text("not a folder\n")
    rc, out = cli(["label", str(log), "--model", str(model), "--out", str(f)])
    ok, ev = one_line_error(rc, out, [""])
    rows.append(row("label_out: --out an existing file", f"exit {rc}", ok, ev))
    o = d / "out"
    o.mkdir()
    (o / "labels").write_text("a file where the shards go\n")
    rc, out = cli(["label", str(log), "--model", str(model), "--out", str(o)])
    ok, ev = one_line_error(rc, out, [""])
    rows.append(row("label_out: OUT/labels a file", f"exit {rc}", ok, ev))
    cwd = d / "empty-cwd"
    cwd.mkdir()
    rc, out = cli(["label", str(log), "--model", str(model), "--out", ""], cwd=cwd)
    new = sorted(listing(cwd))
    ok, ev = one_line_error(rc, out, [""])
    rows.append(
        row("label_out: --out ''", f"exit {rc}, {len(new)} new in cwd", ok and not new, f"{ev}; new in cwd: {new[:8]}")
    )
    return rows


# ---------------------------------------------------------------------------------------------------------------- 5


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}


def restart_symlink(ctx: Ctx) -> list[dict]:
    d, model = folder(ctx, "restart_symlink")
    log = write_log(d / "log.jsonl", ctx.queries[:20])
    out = d / "out"
    rc, text = cli(["label", str(log), "--model", str(model), "--out", str(out)])
    if rc != 0:
        return [row("restart_symlink", "first label failed", False, f"exit {rc}; {' | '.join(lines(text)[-3:])}")]
    shard = sorted((out / "labels").glob("part-*.parquet"))[0]
    elsewhere = d / "elsewhere"
    elsewhere.mkdir()
    for i in range(3):
        shutil.copy(shard, elsewhere / f"part-{i:05d}.parquet")
    before = snapshot(elsewhere)
    shutil.rmtree(out / "labels")
    (out / "labels").symlink_to(elsewhere, target_is_directory=True)
    rc, text = cli(["label", str(log), "--model", str(model), "--out", str(out), "--restart"])
    after = snapshot(elsewhere)
    deleted = sum(name not in after for name in before)
    refused, ev = one_line_error(rc, text, [""])
    untouched = after == before
    ok = deleted == 0 and "Traceback" not in text and (refused or (rc == 0 and untouched))
    return [
        row(
            "restart_symlink: files deleted outside --out",
            f"{deleted}",
            ok,
            f"{ev}; elsewhere before {sorted(before)} after {sorted(after)}; untouched {untouched}",
        )
    ]


# ---------------------------------------------------------------------------------------------------------------- 6


def manifest_rebuild(ctx: Ctx) -> list[dict]:
    d, model = folder(ctx, "manifest_rebuild")
    queries = list(ctx.queries)
    i = 0
    while len(queries) < 3000:  # the tiny world's log has ~2,600 distinct queries; make up the rest
        queries.append(f"{ctx.queries[i]} {i}")
        i += 1
    log = write_log(d / "log.jsonl", queries[:3000])
    out = d / "out"
    args = ["label", str(log), "--model", str(model), "--out", str(out), "--shard-size", "256"]
    rc, text = cli(args, timeout=900)
    if rc != 0:
        return [row("manifest_rebuild", "first label failed", False, f"exit {rc}; {' | '.join(lines(text)[-3:])}")]
    before = label_count(out)
    manifest = out / "manifest.json"
    os.truncate(manifest, manifest.stat().st_size // 2)
    rc, text = cli(args, timeout=900)
    after = label_count(out)
    try:
        summary = json.loads(lines(text)[-1])
    except (json.JSONDecodeError, IndexError):
        summary = {}
    now = summary.get("labeled_now")
    ok = rc == 0 and now == 0 and after == before and "Traceback" not in text
    return [
        row(
            "manifest_rebuild: intact labels kept",
            f"{after}/{before}",
            ok,
            f"exit {rc}; labeled_now {now}; last lines: {' | '.join(x[:200] for x in lines(text)[-2:])}",
        )
    ]


# ---------------------------------------------------------------------------------------------------------------- 7


def slowloris(ctx: Ctx) -> list[dict]:
    import httpx

    d, model = folder(ctx, "slowloris")
    body_timeout, n_slow = 2.0, 900
    log = d / "server.log"
    try:
        server, url = start_server(
            ["--model", str(model), "--workers", "2", "--body-timeout", str(body_timeout)]
            + ["--cache", f"sqlite:///{d}/c.db", "--no-access-log"],
            log,
        )
    except SystemExit as e:
        return [row("slowloris", "server did not start", False, f"{e}; {tail(log)}")]
    port = int(url.rsplit(":", 1)[1])
    warm, new = ctx.queries[0], ctx.queries[1]
    rows = []
    slow: list[socket.socket] = []
    try:
        get(url, warm)
        head = (
            b"POST /v1/parse HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            b'{"queries": ['
        )
        failed_connect = 0
        for _ in range(n_slow):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(head)
                slow.append(s)
            except OSError:
                failed_connect += 1
        opened_at = time.time()
        latencies, statuses = [], Counter()
        with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=30) as http:
            for _ in range(200):
                t0 = time.perf_counter()
                try:
                    statuses[http.get(f"{url}/v1/parse", params={"q": warm}).status_code] += 1
                except httpx.HTTPError as e:
                    statuses[type(e).__name__] += 1
                latencies.append(time.perf_counter() - t0)
        latencies.sort()
        p99 = latencies[int(0.99 * (len(latencies) - 1))]
        rows.append(
            row(
                "slowloris: second-client p99 (s)",
                f"{p99:.3f}",
                p99 < 1.0 and statuses.get(200, 0) == 200,
                f"statuses {dict(statuses)}; max {latencies[-1]:.3f} s; {len(slow)} stalled connections opened, "
                f"{failed_connect} failed to connect",
            )
        )
        time.sleep(max(0.0, opened_at + body_timeout + 3 - time.time()))
        closed = Counter()
        for s in slow:
            s.setblocking(False)
            got, state = b"", "open"
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        state = "eof"
                        break
                    got += chunk
            except BlockingIOError:
                pass
            except OSError:
                state = "reset"
            if state == "open" and got.startswith(b"HTTP/1.1 408"):
                state = "408"
            closed[state] += 1
        still = closed.get("open", 0)
        rows.append(
            row(
                "slowloris: connections still open after timeout",
                f"{still}/{len(slow)}",
                still == 0 and failed_connect == 0,
                f"{dict(closed)}",
            )
        )
        reply = b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"GET /v1/parse?q={urllib.parse.quote(new)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            s.shutdown(socket.SHUT_WR)
            try:
                while chunk := s.recv(65536):
                    reply += chunk
            except OSError as e:
                reply += f" <{type(e).__name__}>".encode()
        status = reply.split(b"\r\n", 1)[0].decode(errors="replace") or "no response (EOF)"
        rows.append(
            row(
                "half_close: GET then SHUT_WR",
                status,
                reply.startswith(b"HTTP/1.1 200"),
                reply[:200].decode(errors="replace"),
            )
        )
    finally:
        for s in slow:
            s.close()
        stop(server)
    return rows


# ---------------------------------------------------------------------------------------------------------------- 8


def read_response(s: socket.socket) -> tuple[str, bool]:
    """(outcome, connection closed after): outcome a status code, "none" (closed/reset before any byte), "torn"
    (closed mid-response) or "timeout"."""
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return ("torn" if buf else "none"), True
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        headers = head.decode("latin-1").lower()
        length = int(m.group(1)) if (m := re.search(r"content-length:\s*(\d+)", headers)) else 0
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                return "torn", True
            body += chunk
        return head[9:12].decode(), "connection: close" in headers
    except socket.timeout:
        return "timeout", True
    except OSError:
        return ("torn" if buf else "none"), True


def sigterm(ctx: Ctx) -> list[dict]:
    d, model = folder(ctx, "sigterm")
    log = d / "server.log"
    try:
        server, url = start_server(["--model", str(model), "--workers", "2", "--no-access-log"], log)
    except SystemExit as e:
        return [row("sigterm", "server did not start", False, f"{e}; {tail(log)}")]
    port = int(url.rsplit(":", 1)[1])
    warm = ctx.queries[:4]
    for q in warm:
        get(url, q)
    pool = ctx.queries[4:]
    termed, done = threading.Event(), threading.Event()
    records: list[tuple[str, bool]] = []  # (outcome, the request went out on a connection that had served one)
    lost_at: list[float] = []  # seconds after SIGTERM each unanswered request ended
    termed_at = [0.0]
    lock = threading.Lock()

    def client(k: int) -> None:
        rng = random.Random(k)
        cold = iter(pool[k::16])
        s, used = None, False
        while not done.is_set():
            if s is None:
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=30)
                    used = False
                except OSError:
                    if termed.is_set():
                        return  # the listener is closed: not a request sent
                    time.sleep(0.05)
                    continue
            q = rng.choice(warm) if rng.random() < 0.7 else next(cold, rng.choice(warm))
            try:
                s.sendall(f"GET /v1/parse?q={urllib.parse.quote(q)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            except OSError:
                s.close()
                s = None
                continue  # not written: not a request sent
            outcome, closed = read_response(s)
            with lock:
                records.append((outcome, used))
                if not outcome.isdigit():
                    lost_at.append(time.time() - termed_at[0] if termed.is_set() else -1.0)
            used = True
            if closed:
                s.close()
                s = None
        if s is not None:
            s.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(16)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    termed_at[0] = time.time()
    termed.set()
    server.send_signal(signal.SIGTERM)
    try:
        rc = server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        rc = None
    exit_s = time.time() - termed_at[0]
    time.sleep(1.0)
    done.set()
    for t in threads:
        t.join(timeout=40)
    stop(server)
    answered = Counter(o for o, _ in records if o.isdigit())
    lost = [(o, used) for o, used in records if not o.isdigit()]
    reused = sum(used for _, used in lost)
    text = log.read_text(errors="replace")
    ok = not lost and "Traceback" not in text
    return [
        row(
            "sigterm: requests unanswered",
            f"sent {len(records)}, answered {dict(answered)}, unanswered {len(lost)}",
            ok,
            f"unanswered {dict(Counter(o for o, _ in lost))}: {reused} on a reused keep-alive connection, "
            f"{len(lost) - reused} as the first request of a connection (TCP accepted, then closed unanswered); "
            f"they ended {sorted(round(x, 2) for x in lost_at)[:8]} s after SIGTERM; server exit {rc} "
            f"{exit_s:.2f} s after SIGTERM; "
            f"tracebacks in log {text.count('Traceback')}",
        )
    ]


# ---------------------------------------------------------------------------------------------------------------- 9


def _refused_round(url: str, queries: list[str], release, count) -> tuple[int, int, dict, str]:
    """Ask `queries` while the store refuses writes, read pending_writes, `release()` the store, wait for the
    pending writes to drain, return (landed, pending while refused, statuses, health after)."""
    answers = Counter(f"{s} {src}" for s, src in (get(url, q) for q in queries))
    time.sleep(1.0)  # the write-backs are in the background
    pending = health(url)["cache"].get("pending_writes", 0)
    release()
    deadline = time.time() + 15
    while time.time() < deadline:
        h = health(url)["cache"]
        if h.get("pending_writes", 0) == 0:
            break
        time.sleep(0.5)
    time.sleep(0.5)
    return count(), pending, dict(answers), json.dumps(h)[:300]


def _has_entries(db: Path) -> bool:
    if not db.exists():
        return False
    with contextlib.closing(sqlite3.connect(db)) as c:
        return c.execute("SELECT 1 FROM sqlite_master WHERE name = 'entries'").fetchone() is not None


REFUSED = "refused_writes: landed after recovery"


def refused_writes(ctx: Ctx) -> list[dict]:
    d, model = folder(ctx, "refused_writes")
    if not shutil.which("redis-server"):
        return [_refused_sqlite(ctx, d, model), row(f"{REFUSED} (redis)", "skipped: no redis-server", True)]
    return [_refused_sqlite(ctx, d, model), _refused_redis(ctx, d, model)]


def _refused_sqlite(ctx: Ctx, d: Path, model: Path) -> dict:
    queries, db, log = ctx.queries[:50], d / "c.db", d / "server-sqlite.log"
    try:
        server, url = start_server(
            ["--model", str(model), "--workers", "1", "--cache", f"sqlite:///{db}", "--no-access-log"], log
        )
    except SystemExit as e:
        return row(f"{REFUSED} (sqlite)", "server did not start", False, f"{e}; {tail(log)}")
    if cache_state(url) == "none":
        stop(server)
        return row(f"{REFUSED} (sqlite)", "--cache ignored", False, IGNORED)
    try:
        get(url, ctx.queries[50])  # the store makes its tables on its first write
        deadline = time.time() + 10
        while time.time() < deadline and not _has_entries(db):
            time.sleep(0.2)
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock: every write-back now fails with `database is locked`

        def release() -> None:
            holder.execute("ROLLBACK")
            holder.close()

        def count() -> int:
            if not _has_entries(db):
                return 0
            with contextlib.closing(sqlite3.connect(db)) as c:
                marks = ",".join("?" * len(queries))
                return c.execute(
                    f"SELECT COUNT(DISTINCT query) FROM entries WHERE query IN ({marks})", [q.lower() for q in queries]
                ).fetchone()[0]

        landed, pending, answers, h = _refused_round(url, queries, release, count)
    finally:
        stop(server)
    return row(
        f"{REFUSED} (sqlite)",
        f"{landed}/50",
        landed == 50 and pending > 0,
        f"pending_writes while locked {pending}; answers {answers}; health after {h}; log: {tail(log, 2)}",
    )


def _refused_redis(ctx: Ctx, d: Path, model: Path) -> dict:
    queries = ctx.queries[:50]
    redis = Redis(d)
    redis.start()
    log = d / "server-redis.log"
    try:
        server, url = start_server(
            ["--model", str(model), "--workers", "1", "--cache", redis.url, "--no-access-log"], log
        )
    except SystemExit as e:
        redis.kill()
        return row(f"{REFUSED} (redis)", "server did not start", False, f"{e}; {tail(log)}")
    if cache_state(url) == "none":
        stop(server)
        redis.kill()
        return row(f"{REFUSED} (redis)", "--cache ignored", False, IGNORED)
    try:
        r = redis.client()
        r.config_set("min-replicas-to-write", "1")  # every write now answers NOREPLICAS

        def count() -> int:
            want = {q.lower() for q in queries}
            return len({k.decode().split(":", 3)[3] for k in r.scan_iter(match="qt:*", count=1000)} & want)

        landed, pending, answers, h = _refused_round(
            url, queries, lambda: r.config_set("min-replicas-to-write", "0"), count
        )
    finally:
        stop(server)
        redis.kill()
    return row(
        f"{REFUSED} (redis)",
        f"{landed}/50",
        landed == 50 and pending > 0,
        f"pending_writes while refused {pending}; answers {answers}; health after {h}; log: {tail(log, 2)}",
    )


# --------------------------------------------------------------------------------------------------------------- 10


def long_line(ctx: Ctx) -> list[dict]:
    import psutil

    d, model = folder(ctx, "long_line")
    log = d / "log.jsonl"
    normal = [json.dumps({"query": q}) + "\n" for q in ctx.queries[:10]]
    with open(log, "w") as f:
        f.writelines(normal[:5])
        f.write('{"query": "')
        block = "a" * (1 << 24)
        for _ in range((1 << 30) // len(block)):
            f.write(block)
        f.write('"}\n')
        f.writelines(normal[5:])
    out = d / "out"
    peak, cap_mb = 0.0, 6000  # past cap_mb it is stopped, to keep the machine up
    try:
        proc = subprocess.Popen(
            [QT, "label", str(log), "--model", str(model), "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
        reader.start()
        p, deadline, killed = psutil.Process(proc.pid), time.time() + 600, ""
        while proc.poll() is None:
            try:
                rss = sum(x.memory_info().rss for x in [p, *p.children(recursive=True)]) / 1e6
                peak = max(peak, rss)
            except psutil.NoSuchProcess:
                pass
            if peak > cap_mb or time.time() > deadline:
                killed = f"killed at {peak:.0f} MB / {time.time() - deadline + 600:.0f} s"
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        rc = proc.wait()
        reader.join(timeout=10)
    finally:
        log.unlink(missing_ok=True)
    text = b"".join(chunks).decode(errors="replace")
    n_rows = 0
    if (out / "rows.parquet").exists():
        import pyarrow.parquet as pq

        n_rows = pq.ParquetFile(out / "rows.parquet").metadata.num_rows
    rejects = (out / "rejects.jsonl").read_bytes().splitlines() if (out / "rejects.jsonl").exists() else []
    reason = json.loads(rejects[0]).get("reason", "") if len(rejects) == 1 else ""
    short = len(rejects) == 1 and len(rejects[0]) < 1024
    says_length = bool(re.search(r"long|length|chars|bytes", reason))
    ok = peak < 1000 and rc == 0 and n_rows == 10 and short and says_length and "Traceback" not in text
    return [
        row(
            "long_line: label peak RSS (MB)",
            f"{peak:.0f}",
            ok,
            f"exit {rc} {killed}; rows.parquet {n_rows} rows; rejects {len(rejects)} line(s) "
            f"{[len(x) for x in rejects[:3]]} bytes; reason {reason[:120]!r}; "
            f"output: {' | '.join(lines(text)[-2:])[:300]}",
        )
    ]


# --------------------------------------------------------------------------------------------------------------- 11


def redis_stopped(ctx: Ctx) -> list[dict]:
    if not shutil.which("redis-server"):
        return [row("redis_stopped", "skipped: no redis-server", True)]
    d, model = folder(ctx, "redis_stopped")
    redis = Redis(d)
    redis.start()
    log = d / "server.log"
    try:
        server, url = start_server(["--model", str(model), "--workers", "1", "--cache", redis.url], log)
    except SystemExit as e:
        redis.kill()
        return [row("redis_stopped", "server did not start", False, f"{e}; {tail(log)}")]
    state = cache_state(url)
    warm, cold = ctx.queries[:10], iter(ctx.queries[10:])
    answers: Counter = Counter()
    rng = random.Random(0)

    def ask(n: int, seconds: float = 0.0) -> None:
        t0 = time.time()
        for i in range(n):
            q = rng.choice(warm) if i % 2 else next(cold)
            answers[get(url, q)[0]] += 1
            time.sleep(max(0.0, t0 + seconds * (i + 1) / n - time.time()))

    try:
        for q in warm:
            answers[get(url, q)[0]] += 1
        ask(40)
        redis.kill()
        ask(200, seconds=10)
        redis.start()
        ask(50)
    finally:
        rc = stop(server)
        redis.kill()
    text = log.read_text(errors="replace")
    never = text.count("Future exception was never retrieved")
    tracebacks = text.count("Traceback")
    s500 = answers.get(500, 0)
    return [
        row(
            "redis_stopped: log errors, status 500",
            ("--cache ignored; " if state == "none" else "") + f"{never} never-retrieved, {tracebacks} tracebacks, "
            f"{s500}x500",
            never == 0 and tracebacks == 0 and s500 == 0 and state != "none",
            (IGNORED + "; " if state == "none" else "")
            + f"statuses {dict(answers)}; server exit {rc}; log: {tail(log, 2)}",
        )
    ]


PROBES = {
    f.__name__: f
    for f in (
        fallback_log,
        broken_model_serve,
        broken_model_cli,
        label_out,
        restart_symlink,
        manifest_rebuild,
        slowloris,
        sigterm,
        refused_writes,
        long_line,
        redis_stopped,
    )
}


@contextlib.contextmanager
def quiet(log: Path):
    """Send file descriptors 1 and 2 to `log` (native code writes there directly); on an error, print its tail."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "wb") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            print(f"probe_ops: the build failed; see {log}", file=sys.__stderr__)
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help=f"Comma-separated probes to run (default all): {', '.join(PROBES)}.")
    ap.add_argument("--keep", action="store_true", help="Keep the temporary folders (their path is printed).")
    ap.add_argument("--out", type=Path, default=Path("runs/probe_ops"), help="Folder for probe_ops.json.")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(PROBES)
    if unknown := [n for n in names if n not in PROBES]:
        raise SystemExit(f"probe_ops: unknown probe(s) {unknown}; known: {', '.join(PROBES)}")

    import resource

    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from querytune.query import check_query

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 900 stalled sockets here and as many in the server
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="querytune-probe-ops-"))
    print(f"probe_ops: building the tiny world and model in {root} ...", file=sys.stderr, flush=True)
    with quiet(root / "build.log"):  # the tiny model's training bars and warnings, some written by native code
        world, model = tiny_world_and_model(root / "shared")
    distinct = {n for n in (check_query(q)[0] for q in pd.read_parquet(world / "log.parquet")["query"]) if n}
    queries = sorted(distinct)
    random.Random(0).shuffle(queries)
    ctx = Ctx(root=root, model=model, world=world, queries=queries)

    rows: list[dict] = []
    try:
        for i, name in enumerate(names, 1):
            t0 = time.time()
            print(f"probe_ops: [{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
            try:
                got = PROBES[name](ctx)
            except Exception as e:  # noqa: BLE001 - a probe that breaks is a row that fails, the others still run
                got = [row(name, "probe crashed", False, f"{type(e).__name__}: {e}; {traceback.format_exc()[-600:]}")]
            rows += got
            held = sum(r["verdict"] == "holds" for r in got)
            print(
                f"probe_ops: [{i}/{len(names)}] {name}: {held}/{len(got)} rows hold ({time.time() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if args.keep:
            print(f"probe_ops: kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    table = Table("probe", "figure", "verdict", title="querytune operator fault probes")
    for r in rows:
        table.add_row(r["probe"], r["figure"], r["verdict"] if r["verdict"] == "holds" else "[bold red]FAILS[/]")
    (Console() if sys.stdout.isatty() else Console(width=160)).print(table)
    (args.out / "probe_ops.json").write_text(json.dumps(rows, indent=2) + "\n")
    sys.exit(1 if any(r["verdict"] == "FAILS" for r in rows) else 0)


if __name__ == "__main__":
    main()
