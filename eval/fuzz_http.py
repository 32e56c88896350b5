"""Fuzz the HTTP server: no request may get a 500 or raise an unhandled exception, and memory must stay put.

    pip install -e '.[fuzz]'   # schemathesis
    python eval/fuzz_http.py [--requests 10000] [--out runs/fuzz_http]

Starts `querytune serve` on a tiny in-process model (or `--model`) with a SQLite cache and an API key, then sends:
1. schemathesis (`st run`, every operation of /openapi.json, the not_a_server_error check, with the key);
2. hand-made requests schemathesis does not write, until `--requests` in all: lone surrogates (JSON escapes and raw
   bytes), NaN / Infinity / 1e999, 5,000-digit numbers, deep nesting, invalid UTF-8, wrong content types, chunked
   bodies over and under the limit, a Content-Length that lies, huge headers and URLs, bad percent-encoding, random
   bytes as a request, no key / a wrong key.
Every request is counted from the server's own access log (one JSON line each). Fails (exit 1) on any 500, any
"unhandled error" in the server's log, or a peak resident size more than 100 MB above the idle size (sampled every
20 ms). A 503 would only mean the model is down, by design. Writes `<out>/fuzz_http.json` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python eval/fuzz_http.py` from a checkout

from querytune.testing import rss_mb, start_server, tiny_world_and_model  # noqa: E402

KEY = "fuzz-key"


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are (h11 / httpx would refuse to write most of these) and read the answer."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                out += chunk
        except OSError:  # reset, broken pipe, not connected: the server may answer and close before reading it all
            pass
    return out


def post(body: bytes, key: str | None = KEY, ctype: bytes = b"application/json", extra: bytes = b"") -> bytes:
    auth = b"X-API-Key: " + key.encode() + b"\r\n" if key else b""
    return (
        b"POST /v1/parse HTTP/1.1\r\nHost: x\r\nContent-Type: "
        + ctype
        + b"\r\n"
        + auth
        + extra
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )


def chunked(body: bytes, size: int = 1000) -> bytes:
    parts = b"".join(
        f"{len(body[i : i + size]):x}\r\n".encode() + body[i : i + size] + b"\r\n" for i in range(0, len(body), size)
    )
    return (
        b"POST /v1/parse HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: "
        + KEY.encode()
        + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + parts
        + b"0\r\n\r\n"
    )


def get(target: bytes, headers: bytes = b"X-API-Key: " + KEY.encode() + b"\r\n") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n"


def hand_made(rng: random.Random) -> bytes:
    """One request of a randomly chosen kind."""
    words = ["cheap", "thai", "plumber", "24h", "brooklyn", "kids", "near me", "café", "日本", "🍕"]
    q = " ".join(rng.choices(words, k=rng.randint(1, 5)))
    kind = rng.randrange(16)
    if kind == 0:
        return post(b'{"queries": ["' + rng.choice([b"\\ud800", b"\\udfff", b"a\\ud83d", b"\\udc00\\ud800"]) + b'"]}')
    if kind == 1:
        return post(b'{"queries": [' + rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]) + b"]}")
    if kind == 2:
        return post(b'{"queries": [' + b"9" * rng.choice([4301, 5000, 50000]) + b"]}")
    if kind == 3:
        depth = rng.choice([100, 1000, 20000])
        return post(b'{"queries": ' + b"[" * depth + b"]" * depth + b"}")
    if kind == 4:
        return post(b'{"queries": ["' + bytes(rng.randrange(128, 256) for _ in range(rng.randint(1, 20))) + b'"]}')
    if kind == 5:
        return post(
            json.dumps({"queries": [q]}).encode(),
            ctype=rng.choice([b"text/plain", b"application/xml", b"multipart/form-data", b""]),
        )
    if kind == 6:
        return chunked(b'{"queries": ["' + b"a" * rng.choice([10, 60_000, 70_000, 300_000]) + b'"]}')
    if kind == 7:  # a Content-Length that says less than is sent
        body = json.dumps({"queries": [q]}).encode()
        return (
            post(body)[: -len(body)].replace(
                f"Content-Length: {len(body)}".encode(), f"Content-Length: {max(1, len(body) // 2)}".encode()
            )
            + body
        )
    if kind == 8:
        return get(b"/v1/parse?q=" + b"x" * rng.choice([300, 5000, 60000]))
    if kind == 9:
        return get(
            b"/v1/parse?q=" + rng.choice([b"%ED%A0%80", b"%FF%FE", b"%", b"%zz", b"%C0%AF", b"caf%E9", b"a%00b"])
        )
    if kind == 10:
        return get(
            b"/v1/parse?q=pizza",
            headers=b"X-API-Key: "
            + KEY.encode()
            + b"\r\nX-Junk: "
            + b"h" * rng.choice([100, 10_000, 100_000])
            + b"\r\n",
        )
    if kind == 11:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
    if kind == 12:
        return get(
            b"/v1/parse?q=" + q.encode(),
            headers=rng.choice(
                [
                    b"",
                    b"X-API-Key: wrong\r\n",
                    b"Authorization: Bearer \xff\xfe\r\n",
                    b"Authorization: Basic Zm9vOmJhcg==\r\n",
                ]
            ),
        )
    if kind == 13:
        return post(json.dumps({"queries": [q] * rng.choice([1, 64, 65, 1000])}).encode())
    if kind == 14:
        return post(json.dumps({"queries": [q], "extra": {"nested": [1, 2, {"x": None}]}}).encode())
    return get(
        rng.choice(
            [
                b"/",
                b"/healthz",
                b"/metrics",
                b"/docs",
                b"/openapi.json",
                b"/v1/parse",
                b"/v1/nowhere",
                b"/../../etc/passwd",
            ]
        )
    )


class Sampler(threading.Thread):
    """Peak resident size of a process, sampled every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.running = pid, 0.0, True

    def run(self) -> None:
        while self.running:
            try:
                self.peak_mb = max(self.peak_mb, rss_mb(self.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--requests", type=int, default=10_000, help="Requests in all (schemathesis's, then hand-made ones)."
    )
    ap.add_argument("--schemathesis-examples", type=int, default=800, help="schemathesis --max-examples per operation.")
    ap.add_argument("--model", type=Path, help="Model folder to serve (default: a tiny in-process model).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", type=Path, default=Path("runs/fuzz_http"), help="Folder for fuzz_http.json and the server's log."
    )
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="querytune-fuzz-"))
    model = args.model or tiny_world_and_model(work)[1]
    log_path = args.out / "server.log"
    # one worker: the resident size measured is the process that serves
    server, url = start_server(
        [
            "--model",
            str(model),
            "--cache",
            f"sqlite:///{work}/cache.db",
            "--api-key",
            KEY,
            "--deadline",
            "5",
            "--workers",
            "1",
        ],
        log_path,
    )
    port = int(url.rsplit(":", 1)[1])
    import httpx

    for q in ("cheap thai", "plumber brooklyn", "dentist"):  # warm-up: the model's first calls allocate their buffers
        httpx.get(f"{url}/v1/parse", params={"q": q}, headers={"X-API-Key": KEY}, timeout=30)
    idle_mb = rss_mb(server.pid)
    sampler = Sampler(server.pid)
    sampler.start()

    t0 = time.time()
    if not (Path(sys.executable).parent / "st").is_file():
        raise SystemExit("fuzz: schemathesis is not installed: pip install -e '.[fuzz]'")
    st = subprocess.run(
        [
            str(Path(sys.executable).parent / "st"),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "-n",
            str(args.schemathesis_examples),
            "--seed",
            str(args.seed),
            "-H",
            f"X-API-Key: {KEY}",
            "--workers",
            "2",
            "--no-shrink",
            "--request-timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        cwd=args.out,
    )  # its .schemathesis/ cache there
    st_tail = st.stdout[-1500:]
    schemathesis_requests = sum(
        1 for line in log_path.read_text(errors="replace").splitlines() if line.startswith('{"ts"')
    )
    rng = random.Random(args.seed)
    sent, answers = 0, Counter()
    while schemathesis_requests + sent < args.requests:
        reply = raw(port, hand_made(rng))
        answers[reply[9:12].decode("latin-1") if reply.startswith(b"HTTP/1.1 ") else "closed"] += (
            1  # h11 refuses some before the app
        )
        sent += 1
    time.sleep(1.0)
    sampler.running = False
    server.send_signal(signal.SIGINT)
    server.wait(timeout=30)

    text = log_path.read_text(errors="replace")
    access = [json.loads(line) for line in text.splitlines() if line.startswith('{"ts"')]
    statuses = Counter(a["status"] for a in access)
    unhandled = text.count("unhandled error") + text.count("Traceback")
    from querytune.machine import hardware

    summary = {
        "requests_logged": len(access),
        "schemathesis_requests": schemathesis_requests,
        "hand_made_sent": sent,
        "schemathesis_exit": st.returncode,
        "statuses": dict(sorted(statuses.items())),
        "hand_made_answers": dict(sorted(answers.items())),
        "status_500": statuses.get(500, 0),
        "unhandled_in_log": unhandled,
        "rss_mb": {
            "idle": round(idle_mb, 1),
            "peak": round(sampler.peak_mb, 1),
            "growth": round(sampler.peak_mb - idle_mb, 1),
        },
        "seconds": round(time.time() - t0, 1),
        "cpu": hardware(),
    }
    (args.out / "fuzz_http.json").write_text(json.dumps(summary | {"schemathesis_tail": st_tail}, indent=2) + "\n")
    print(st_tail)
    print(json.dumps(summary))
    ok = (
        summary["status_500"] == 0
        and answers.get("500", 0) == 0
        and unhandled == 0
        and summary["rss_mb"]["growth"] <= 100
        and st.returncode == 0
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
