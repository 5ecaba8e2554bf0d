"""Connection guards: header and body read deadlines and a connection cap, in uvicorn's protocol.

uvicorn bounds neither how long a client may take to send a request's headers or body
nor how many connections stay open: its keep-alive timer starts only after a response and
stops at the next byte, and ``limit_concurrency`` answers 503 only once the headers are in,
counting the very connections that trickle them. A client that opens many connections and
sends a byte now and then (slowloris, slow POST) would hold them for ever.

``guarded_protocol(limits, metrics)`` subclasses uvicorn's HTTP protocol class (httptools,
or h11 where httptools is missing) and is handed to uvicorn as ``http=`` (``uvicorn_options``).
Per connection it adds:

- a header deadline (``--header-timeout-s``) from the connection's start, or from the first
  byte of a later request on a kept-alive connection, until the request's headers are parsed.
  Missed: 408 and the connection is closed; closed without an answer when nothing at all was
  sent (a client racing a request onto that connection would read the 408 as its answer).
  Every such last answer is followed by a lingering close: the server stops writing (FIN),
  drops what the client still sends for ``LINGER_S``, then closes; closing at once with unread
  bytes would send a reset, which can destroy the answer before the client reads it;
- a body deadline (``--body-timeout-s``) from the headers to the end of the body. Missed: 408
  when the app has not started answering (the app then sees ``http.disconnect``), and the
  connection is closed. It is pushed back while uvicorn itself has paused reading because the
  app has not consumed what came (the server is behind then, not the client);
- a cap (``--max-connections``): at the cap the longest-idle keep-alive connection is closed to
  make room (nginx does the same); when none is idle, the new connection is answered 503 with
  Retry-After, and closed the same lingering way.

Only uvicorn's documented extension point (a protocol class as ``http=``) and the state its
two HTTP implementations share (``cycle`` with ``more_body``/``response_started``/
``response_complete``, ``connections``, ``flow``, ``timeout_keep_alive_task``,
``on_response_complete``) are used; ``tests/service/test_connections.py`` runs the guards on
both implementations, so an upgrade that changes them fails there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

from service.http.errors import error_body
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger("llave.connections")

# After a last answer (408, or 503 at the cap), how long the client's further bytes are read
# and dropped before the connection is closed (see the module docstring).
LINGER_S = 2.0


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    retry_after_s: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            max_connections=settings.max_connections,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            retry_after_s=settings.retry_after_s,
        )


def canned_response(status: int, kind: str, message: str, headers: tuple[str, ...] = ()) -> bytes:
    """A complete ``Connection: close`` response with the service's JSON error body."""
    body = json.dumps(error_body(kind, message)).encode()
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _Guards:
    """Mixed in before uvicorn's protocol class; see the module docstring."""

    limits: ClassVar[ConnectionLimits]
    metrics: ClassVar[Metrics | None] = None

    # Set by uvicorn's protocol (both implementations).
    connections: set[Any]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any
    flow: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "headers" or "body" while a deadline runs
        self._got_bytes = False  # bytes of the current request's head were received
        self._watched_cycle: Any = None  # the last request whose headers were seen complete
        self._idle_since: float | None = None  # set while idle between keep-alive requests
        self._refused = False  # refused at the cap: uvicorn's protocol never saw it
        self._lingering = False  # a last answer was sent: the client's bytes are dropped

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.connections) >= self.limits.max_connections and not self._evict_idle():
            self._refuse(transport)  # type: ignore[arg-type]
            return
        super().connection_made(transport)  # type: ignore[misc]
        self._opened()
        self._start("headers", self.limits.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # a last answer is on its way: what follows is dropped
        self._idle_since = None
        if self._phase is None and (self.cycle is None or self.cycle.response_complete):
            self._start("headers", self.limits.header_timeout_s)  # a new request's first byte
        if self._phase == "headers":
            self._got_bytes = True
        super().data_received(data)  # type: ignore[misc]
        self._advance()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        self._idle_since = None
        if self._refused:
            return
        super().connection_lost(exc)  # type: ignore[misc]
        self._opened()

    # --- uvicorn's callback when a response has been sent ------------------------------

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # Idle when uvicorn armed its keep-alive timer, no pipelined request has started and no
        # body is still being drained under our deadline.
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self._phase is None and getattr(self, "timeout_keep_alive_task", None) is not None:
            # time.monotonic, not loop.time: uvloop's clock ticks in whole milliseconds, so
            # connections that went idle in the same millisecond would tie.
            self._idle_since = time.monotonic()

    # --- deadlines ---------------------------------------------------------------------

    def _advance(self) -> None:
        """After the parser ran: move from the header deadline to the body's, or stop."""
        cycle = self.cycle
        if cycle is not None and cycle is not self._watched_cycle:  # a request's headers are in
            self._watched_cycle = cycle
            self._got_bytes = False
            if cycle.more_body and not cycle.response_complete:
                self._start("body", self.limits.body_timeout_s)
            else:
                self._stop()
        elif self._phase == "body" and (cycle is None or not cycle.more_body):
            self._stop()

    def _start(self, phase: str, seconds: float) -> None:
        self._stop()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _stop(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = None

    def _expired(self) -> None:
        phase, self._deadline = self._phase, None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        cycle = self.cycle
        if phase == "body":
            if self.flow is not None and self.flow.read_paused and not cycle.response_complete:
                self._start("body", self.limits.body_timeout_s)  # uvicorn paused reading, not the client
                return
            self._count("body_timeout")
            if not cycle.response_started:
                # The app's receive() now returns http.disconnect, and its sends are dropped.
                cycle.disconnected = True
                cycle.message_event.set()
                message = f"the request body was not received within {self.limits.body_timeout_s:g} s"
                self._last_answer(canned_response(408, "request_timeout", message))
                return
        elif phase == "headers":
            self._count("header_timeout")
            if self._got_bytes and (cycle is None or cycle.response_complete):
                message = f"the request headers were not received within {self.limits.header_timeout_s:g} s"
                self._last_answer(canned_response(408, "request_timeout", message))
                return
        self._phase = None
        transport.close()

    def _last_answer(self, response: bytes) -> None:
        """Send ``response``, stop writing, drop what the client still sends, close after ``LINGER_S``."""
        transport = self.transport
        self._phase = None
        self._lingering = True
        transport.write(response)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()  # the client reads the answer and closes; eof_received closes ours
        self._deadline = self.loop.call_later(LINGER_S, transport.close)

    # --- the cap -----------------------------------------------------------------------

    def _evict_idle(self) -> bool:
        """Close the longest-idle keep-alive connection, if there is one."""
        idle = [c for c in self.connections if getattr(c, "_idle_since", None) is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._idle_since)
        oldest._idle_since = None
        oldest.transport.close()
        self._count("idle_evicted")
        return True

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused = True
        self.transport = transport
        self._count("over_capacity")
        retry = self.limits.retry_after_s
        message = f"the server has {self.limits.max_connections} connections open; retry later"
        self._last_answer(canned_response(503, "unavailable", message, (f"retry-after: {retry}",)))

    # --- metrics -----------------------------------------------------------------------

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_closed.labels(reason=reason).inc()

    def _opened(self) -> None:
        if self.metrics is not None:
            self.metrics.connections_open.set(len(self.connections))


def guarded_protocol(
    limits: ConnectionLimits, metrics: Metrics | None = None, base: type[asyncio.Protocol] | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (``base``; default: httptools, else h11) with the guards."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    attributes = {"limits": limits, "metrics": metrics, "__module__": __name__}
    return type(f"Guarded{base.__name__}", (_Guards, base), attributes)


def uvicorn_options(settings: Settings, metrics: Metrics | None = None) -> dict[str, Any]:
    """The ``uvicorn.run`` options that enforce the connection settings."""
    return {
        "http": guarded_protocol(ConnectionLimits.from_settings(settings), metrics),
        "ws": "none",  # no WebSocket routes: upgrades are not offered
        "timeout_keep_alive": settings.keep_alive_timeout_s,
    }
