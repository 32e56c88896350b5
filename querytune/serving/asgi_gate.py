"""The pure-ASGI gate in front of the server's app: request ids, the key check, the body's size and time limits, the
access log, the hit path.

It sits outside FastAPI so that a body over the limit is refused while it is being received (a chunked body has no
Content-Length to trust, and the app would otherwise read all of it), so that every request, the refused ones too,
gets an `X-Request-ID` and one access-log line (`AccessLog`, JSON), and so that a cache hit can be answered without
entering FastAPI at all (`answer`, given by `querytune.serving.serve`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import time
from typing import Callable


def error_body(status: int, code: str, message: str, request_id: str) -> tuple[int, bytes]:
    """The server's one error body (`querytune.serving.api.ErrorBody`), for answers given before the app is reached."""
    return status, json.dumps({"error": message, "code": code, "request_id": request_id}).encode()


REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Gate:
    """Pure ASGI middleware in front of the app: a request id for every request, the one key check of a `/v1/` request
    (`authorized(headers)`), the body-size limit enforced on the bytes actually received (a chunked body has no
    Content-Length to trust), a body that does not arrive within `body_timeout_s` answered 408, and the access log.

    `answer(scope, headers)` is asked next: the JSON body of a 200 that needs no app (the server's cache hits), or
    None, and the app answers. `headers` maps each lower-case header name to its first value, as Starlette reads it."""

    def __init__(
        self,
        app,
        max_body_bytes: int,
        on_refuse: Callable[[str], None] | None = None,
        access: AccessLog | None = None,
        answer: Callable[[dict, dict[bytes, bytes]], bytes | None] | None = None,
        authorized: Callable[[dict[bytes, bytes]], bool] | None = None,
        body_timeout_s: float = 10.0,
    ):
        self.app, self.max_body_bytes, self.on_refuse, self.access = app, max_body_bytes, on_refuse, access
        self.answer, self.authorized, self.body_timeout_s = answer, authorized, body_timeout_s
        # ids a process hands out: random to the process, then counted (os.urandom per request costs more than a
        # hit's lookup)
        self.ids = map(f"{os.urandom(6).hex()}{{:010x}}".format, itertools.count())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(reversed(scope["headers"]))
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if given and REQUEST_ID.fullmatch(given) else next(self.ids)
        if self.authorized and scope["path"].startswith("/v1/") and not self.authorized(headers):
            message = "missing or wrong API key (send X-API-Key or Authorization: Bearer)"
            return await self._refuse(send, scope, rid, t0, 401, "auth", message)
        body = self.answer(scope, headers) if self.answer else None
        if body is not None:  # the headers, in order, that Starlette gives a JSON response, and the id
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
            return self._log(scope, rid, 200, t0)
        scope.setdefault("state", {})["request_id"] = rid
        status = [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        if scope["method"] in ("POST", "PUT", "PATCH"):
            try:
                body, too_big = await asyncio.wait_for(
                    self._read_body(headers.get(b"content-length"), receive), self.body_timeout_s
                )
            except asyncio.TimeoutError:  # a slow or stalled client must not hold the connection
                message = f"request body not received within {self.body_timeout_s:g} s"
                return await self._refuse(send, scope, rid, t0, 408, "timeout", message)
            if too_big:
                message = f"request body over {self.max_body_bytes} bytes"
                return await self._refuse(send, scope, rid, t0, 413, "body", message)
            receive = _replay(body)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._log(scope, rid, status[0], t0)

    async def _refuse(self, send, scope, rid: str, t0: float, status: int, code: str, message: str) -> None:
        if self.on_refuse:
            self.on_refuse(code)
        await self._respond(send, *error_body(status, code, message, rid), rid)
        self._log(scope, rid, status, t0)

    async def _read_body(self, declared: bytes | None, receive) -> tuple[bytes, bool]:
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return b"", True
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:  # stop reading: the rest is never buffered
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks), False

    @staticmethod
    async def _respond(send, status: int, body: bytes, rid: str) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    (b"x-request-id", rid.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _log(self, scope, rid: str, status: int, t0: float) -> None:
        if self.access is not None:
            self.access.write(scope, rid, status, t0)


class Periodic:
    """Work gathered per request and done every `every_s` seconds on the event loop, or at once on `flush()`: a timer
    is armed by the first request after a flush (`arm`) and disarmed by the flush (`disarm`)."""

    every_s: float
    timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.every_s, self.flush)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def flush(self) -> None:
        raise NotImplementedError


class AccessLog(Periodic):
    """One JSON line per request (time, request id, method, path, status, ms, client), written to a file descriptor
    in batches: every `every_s` seconds, every 1,024 lines and on `flush()`. Each write is whole lines and at most
    4,096 bytes, which a pipe writes atomically, so the lines of workers sharing stderr never interleave. A logging
    record and a write per line would cost more than the cache hit they record."""

    def __init__(self, fd: int, every_s: float = 0.5):
        self.fd, self.every_s, self.pending = fd, every_s, []
        self.paths: dict[
            str, str
        ] = {}  # path -> its JSON string, for the few paths a server sees (bounded: clients choose them)

    def write(self, scope, rid: str, status: int, t0: float) -> None:
        # the line is formatted at the flush, many at a time: per request only what it must record now
        self.pending.append(
            (time.time(), rid, scope["method"], scope["path"], scope.get("client"), status, time.perf_counter() - t0)
        )
        if len(self.pending) >= 1024:
            self.flush()
        else:
            self.arm()

    def flush(self) -> None:
        self.disarm()
        pending, self.pending = self.pending, []
        chunk: list[bytes] = []
        size = 0
        for line in map(self.line, pending):
            if chunk and size + len(line) > 4096:
                os.write(self.fd, b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            os.write(self.fd, b"".join(chunk))

    def line(self, record: tuple) -> bytes:
        ts, rid, method, path, client, status, seconds = record
        # written by hand, at half json.dumps's cost: the id is checked by the gate, the method is an HTTP token (no
        # quote or backslash) and the client an address; only the path needs escaping
        quoted = self.paths.get(path)
        if quoted is None:
            quoted = json.dumps(path)
            if len(self.paths) < 256:
                self.paths[path] = quoted
        return (
            f'{{"ts": {ts:.3f}, "request_id": "{rid}", "method": "{method}", "path": {quoted}, '
            f'"status": {status}, "ms": {1000 * seconds:.3f}, "client": "{(client or ("",))[0]}"}}\n'
        ).encode()


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # like a client that keeps the connection open: nothing more to read

    return receive
