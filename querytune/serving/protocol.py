"""The server's HTTP connections: uvicorn's httptools protocol with four changes an operator needs.

- A client that sends its request and half-closes (shuts down its writing side) still gets the answer: uvicorn
  closes on end-of-file, which loses the answer to any miss.
- A connection must send a request's headers within `header_timeout_s` of opening or of its previous answer; a
  slowloris that trickles headers, or opens and sends nothing, is closed. (A body too slow is the gate's 408.)
- A connection past `max_connections` open in this worker is answered 503 at once, in the server's one error body,
  and closed (uvicorn's own limit answers in plain text, and only once the request has arrived).
- At shutdown an idle keep-alive connection is kept open for `drain_s`, not closed at once: a request already on its
  way is answered, with `Connection: close`, instead of meeting a closed socket.
"""

from __future__ import annotations

import json
import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_BUSY = json.dumps({"error": "too many connections; try again", "code": "busy", "request_id": ""}).encode()
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
)


class Protocol(HttpToolsProtocol):
    # set from the settings by the worker (querytune.serving.serve)
    header_timeout_s = 10.0
    max_connections = 1024
    drain_s = 1.0
    closing = False
    waiting_since: float | None = None  # when the connection began to owe its request's headers
    # one sweep a second per event loop closes the late ones: a timer armed per request costs every hit a heap push
    swept_loop = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(BUSY)
            transport.close()
            return
        self.waiting_since = time.monotonic()
        if Protocol.swept_loop is not self.loop:
            Protocol.swept_loop = self.loop
            self.loop.call_later(1.0, _sweep, self.connections, self.loop)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.waiting_since = time.monotonic()

    def on_headers_complete(self) -> None:
        self.waiting_since = None
        super().on_headers_complete()
        if self.closing and self.cycle is not None:
            self.cycle.keep_alive = False

    def eof_received(self) -> bool | None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.more_body:
            return None  # nothing owed, or a body that can never complete: the transport closes
        cycle.keep_alive = False  # answer, then close
        return True

    def shutdown(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self.closing = True
            self.loop.call_later(self.drain_s, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def _sweep(connections: set, loop) -> None:
    """Close the connections that have owed their request's headers for longer than the timeout; again in a second."""
    late = time.monotonic() - Protocol.header_timeout_s
    for conn in list(connections):
        since = getattr(conn, "waiting_since", None)
        if since is not None and since < late and not conn.transport.is_closing():
            conn.transport.close()
    loop.call_later(1.0, _sweep, connections, loop)
