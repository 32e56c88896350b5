"""The server's HTTP connections: uvicorn's httptools protocol with three changes an operator needs.

- A client that sends its request and half-closes (shuts down its writing side) still gets the answer: uvicorn
  closes on end-of-file, which loses the answer to any miss.
- A connection must send a request's headers within `header_timeout_s` of opening or of its previous answer; a
  slowloris that trickles headers, or opens and sends nothing, is closed. (A body too slow is the gate's 408.)
- At shutdown an idle keep-alive connection is kept open for `drain_s`, not closed at once: a request already on its
  way is answered, with `Connection: close`, instead of meeting a closed socket.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class Protocol(HttpToolsProtocol):
    header_timeout_s = 10.0  # set from the settings' body_timeout by the worker (querytune.serving.serve)
    drain_s = 1.0
    closing = False
    header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        if self.closing and self.cycle is not None:
            self.cycle.keep_alive = False

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

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

    def _arm(self) -> None:
        self._disarm()
        self.header_timer = self.loop.call_later(self.header_timeout_s, self._no_headers)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _no_headers(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.transport.close()
