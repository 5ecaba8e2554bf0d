"""Connection guards (service/http/connections.py) on a real uvicorn, for both of its HTTP parsers.

A tiny ASGI app stands in for the service (no model): it reads the whole body and answers
with its length. Deadlines are short (0.5 s) so that the tests are quick. Timing is held
one way only: a guard must not fire before its deadline (a lower bound on the monotonic
clock, which a slow or loaded machine can only make longer, never fail). That it fires at
all is shown by its answer and its counter, not by a stopwatch; the sockets' 20 s timeout
only turns a hang into a failure.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.http.connections import ConnectionLimits, guarded_protocol, uvicorn_options
from service.metrics import Metrics
from service.settings import Settings

DEADLINE = 0.5
CAP = 8


class App:
    """Reads the body (after ``delay_s``), answers ``{"bytes": n}``; records disconnects."""

    def __init__(self) -> None:
        self.disconnects = 0
        self.delay_s = 0.0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        await asyncio.sleep(self.delay_s)
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = json.dumps({"bytes": size}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Running:
    def __init__(self, base) -> None:
        self.app = App()
        self.metrics = Metrics()
        limits = ConnectionLimits(
            max_connections=CAP, header_timeout_s=DEADLINE, body_timeout_s=DEADLINE, retry_after_s=3
        )
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            http=guarded_protocol(limits, self.metrics, base=base),
            ws="none",
            lifespan="off",
            log_level="warning",
            timeout_keep_alive=30,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)

    def closed(self, reason: str) -> float:
        return self.metrics.connections_closed.labels(reason=reason)._value.get()

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        return sock

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(params=[HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
def server(request):
    running = Running(request.param)
    yield running
    running.stop()


def read_response(sock: socket.socket) -> bytes:
    """Everything until the server closes (or 20 s)."""
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def request_bytes(body: bytes = b"", close: bool = False) -> bytes:
    head = f"POST /x HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return (head + ("connection: close\r\n" if close else "") + "\r\n").encode() + body


def one_response(sock: socket.socket) -> bytes:
    """One response on a kept-alive connection (the app's answers are small)."""
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_trickled_headers_get_408_at_the_deadline_however_active_the_client(server):
    with server.connect() as sock:
        started = time.monotonic()
        sock.sendall(b"POST /x HTTP/1.1\r\nhost: t\r\nx-pad: ")
        for _ in range(int(3 * DEADLINE / 0.05)):  # a byte every 50 ms, for three deadlines
            try:
                sock.sendall(b"a")
            except OSError:
                break
            time.sleep(0.05)
        response = read_response(sock)
        elapsed = time.monotonic() - started
    assert status_of(response) == 408, response
    assert b'"request_timeout"' in response and b"connection: close" in response.lower()
    assert elapsed >= DEADLINE * 0.9  # not before the deadline, however active the client
    assert server.closed("header_timeout") == 1


def test_a_silent_connection_is_closed_without_an_answer(server):
    with server.connect() as sock:
        started = time.monotonic()
        assert read_response(sock) == b""
        assert time.monotonic() - started >= DEADLINE * 0.9
    assert server.closed("header_timeout") == 1


def test_a_slow_body_gets_408_and_the_app_sees_a_disconnect(server):
    with server.connect() as sock:
        sock.sendall(request_bytes()[:-2].replace(b"content-length: 0", b"content-length: 100") + b"\r\n")
        started = time.monotonic()
        for _ in range(int(3 * DEADLINE / 0.05)):
            try:
                sock.sendall(b" ")
            except OSError:
                break
            time.sleep(0.05)
        response = read_response(sock)
        elapsed = time.monotonic() - started
    assert status_of(response) == 408, response
    assert b"body" in response
    assert elapsed >= DEADLINE * 0.9
    assert server.closed("body_timeout") == 1
    deadline = time.monotonic() + 10
    while server.app.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.app.disconnects == 1


def test_an_idle_kept_alive_connection_is_not_cut_by_the_header_deadline(server):
    with server.connect() as sock:
        sock.sendall(request_bytes(b"{}"))
        assert status_of(one_response(sock)) == 200
        time.sleep(3 * DEADLINE)  # idle: the keep-alive timeout (30 s) applies, not the header deadline
        sock.sendall(request_bytes(b"[1]"))
        response = one_response(sock)
    assert status_of(response) == 200 and response.endswith(b'{"bytes": 3}')
    assert server.closed("header_timeout") == 0


def test_a_body_the_app_is_slow_to_read_is_not_the_clients_fault(server):
    server.app.delay_s = 3 * DEADLINE  # uvicorn pauses reading once 64 KiB wait unread
    body = b" " * (1024 * 1024)
    with server.connect() as sock:
        sock.sendall(request_bytes(body, close=True))
        response = read_response(sock)
    assert status_of(response) == 200, response[:200]
    assert response.endswith(b'{"bytes": %d}' % len(body))
    assert server.closed("body_timeout") == 0


def test_at_the_cap_a_new_connection_gets_503_then_is_served_once_room_is_made(server):
    silent = [server.connect() for _ in range(CAP)]
    deadline = time.monotonic() + 20  # a hang guard: waits for the server to count all CAP
    while server.metrics.connections_open._value.get() < CAP:
        assert time.monotonic() < deadline, "the server did not accept the connections"
        time.sleep(0.01)
    try:
        with server.connect() as sock:
            sock.sendall(request_bytes(b"{}", close=True))
            response = read_response(sock)
        assert status_of(response) == 503, response
        assert b"retry-after: 3" in response.lower() and b'"unavailable"' in response
        assert server.closed("over_capacity") == 1
        for sock in silent:  # the silent ones are dropped at the header deadline
            assert read_response(sock) == b""
    finally:
        for sock in silent:
            sock.close()
    with server.connect() as sock:
        sock.sendall(request_bytes(b"{}", close=True))
        assert status_of(read_response(sock)) == 200


def test_at_the_cap_an_idle_kept_alive_connection_makes_room(server):
    kept = []
    try:
        for _ in range(CAP):
            sock = server.connect()
            sock.sendall(request_bytes(b"{}"))
            assert status_of(one_response(sock)) == 200
            kept.append(sock)
        with server.connect() as sock:
            sock.sendall(request_bytes(b"{}", close=True))
            assert status_of(read_response(sock)) == 200
        assert server.closed("idle_evicted") == 1 and server.closed("over_capacity") == 0
        evicted = []
        for sock in kept:
            sock.settimeout(0.5)
            try:
                evicted.append(sock.recv(1) == b"")
            except TimeoutError:
                evicted.append(False)
        assert evicted.count(True) == 1
        assert evicted[0]  # the longest idle
    finally:
        for sock in kept:
            sock.close()


def test_the_service_passes_its_settings_to_uvicorn():
    settings = Settings(
        model="m", max_connections=5, header_timeout_s=1.5, body_timeout_s=2.5, keep_alive_timeout_s=9
    )
    options = uvicorn_options(settings)
    assert options["timeout_keep_alive"] == 9 and options["ws"] == "none"
    limits = options["http"].limits
    assert (limits.max_connections, limits.header_timeout_s, limits.body_timeout_s) == (5, 1.5, 2.5)
    assert issubclass(options["http"], HttpToolsProtocol)  # uvicorn[standard]: httptools
