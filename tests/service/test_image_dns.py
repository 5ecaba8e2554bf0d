"""DNS rebinding: an image URL's host is resolved once per connection, and that connection
goes to the address that was checked (service/inference/images.py, CheckedNetworkBackend).

The resolver is a stand-in that answers a public address first and 127.0.0.1 second (what a
rebinding DNS server does). The image host runs on 127.0.0.1; the connector maps the public
address to it, standing for "the public server", and records every address it is asked for.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpcore
import pytest

from model.errors import InvalidInputError as InvalidInputApiError
from service.inference.images import ImageFetcher
from tests.conftest import make_png

PNG = make_png(16, 16, (200, 10, 10))
PUBLIC = ipaddress.ip_address("8.8.8.8")
LOOPBACK = ipaddress.ip_address("127.0.0.1")
HOST = "images.test"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so that only a new connection resolves again

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.paths.append(self.path)
        if self.path == "/img.png":
            self._reply(200, PNG)
        elif self.path == "/redirect-close":  # the next hop needs a new connection
            self._reply(302, b"", {"Location": "/img.png", "Connection": "close"})
            self.close_connection = True
        else:
            self._reply(404, b"")

    def _reply(self, status, body, headers=None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def image_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.paths = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


class Resolver:
    """Answers from a script, one answer per call; records the calls."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls: list[str] = []

    async def __call__(self, host, port):
        self.calls.append(host)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.fixture
def connects(monkeypatch):
    """Addresses the HTTP client connected to; the public one reaches the local image server."""
    seen: list[str] = []
    original = httpcore.AnyIOBackend.connect_tcp

    async def connect_tcp(self, host, port, **kwargs):
        seen.append(host)
        return await original(self, "127.0.0.1" if host == str(PUBLIC) else host, port, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", connect_tcp)
    return seen


def fetch_all(fetcher: ImageFetcher, urls: list[str]) -> list[bytes | Exception]:
    async def go():
        results = []
        try:
            for url in urls:
                try:
                    results.append(await fetcher.fetch(url))
                except InvalidInputApiError as exc:
                    results.append(exc)
        finally:
            await fetcher.aclose()
        return results

    return asyncio.run(go())


def url(server, path: str) -> str:
    return f"http://{HOST}:{server.server_address[1]}{path}"


def test_the_host_is_resolved_once_and_the_checked_address_is_connected(image_server, connects):
    resolver = Resolver([PUBLIC], [LOOPBACK])
    fetcher = ImageFetcher([HOST], max_bytes=4096, timeout_s=5, resolver=resolver)
    assert fetch_all(fetcher, [url(image_server, "/img.png")]) == [PNG]
    assert resolver.calls == [HOST]  # never asked a second time
    assert connects == [str(PUBLIC)]  # the checked address, not the name


def test_a_rebinding_answer_on_a_new_connection_is_refused(image_server, connects):
    resolver = Resolver([PUBLIC], [LOOPBACK])
    first = ImageFetcher([HOST], max_bytes=4096, timeout_s=5, resolver=resolver)
    assert fetch_all(first, [url(image_server, "/img.png")]) == [PNG]
    second = ImageFetcher([HOST], max_bytes=4096, timeout_s=5, resolver=resolver)  # a new connection
    [result] = fetch_all(second, [url(image_server, "/img.png")])
    assert isinstance(result, InvalidInputApiError) and "non-public" in str(result)
    assert resolver.calls == [HOST, HOST]
    assert connects == [str(PUBLIC)]  # nothing was sent to 127.0.0.1
    assert image_server.paths == ["/img.png"]


def test_a_redirect_is_resolved_and_checked_again(image_server, connects):
    resolver = Resolver([PUBLIC], [LOOPBACK])
    fetcher = ImageFetcher([HOST], max_bytes=4096, timeout_s=5, resolver=resolver)
    [result] = fetch_all(fetcher, [url(image_server, "/redirect-close")])
    assert isinstance(result, InvalidInputApiError) and "non-public" in str(result)
    assert resolver.calls == [HOST, HOST] and connects == [str(PUBLIC)]
    assert image_server.paths == ["/redirect-close"]  # the redirect's target was never asked for


def test_a_kept_alive_connection_is_reused_without_resolving_again(image_server, connects):
    resolver = Resolver([PUBLIC], [LOOPBACK])
    fetcher = ImageFetcher([HOST], max_bytes=4096, timeout_s=5, resolver=resolver)
    assert fetch_all(fetcher, [url(image_server, "/img.png")] * 3) == [PNG] * 3
    assert resolver.calls == [HOST] and connects == [str(PUBLIC)]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ([PUBLIC, LOOPBACK], "non-public"),
        ([ipaddress.ip_address("169.254.169.254")], "non-public"),
        ([], "resolved"),
    ],
)
def test_any_non_public_answer_or_none_is_refused_before_connecting(image_server, connects, answer, message):
    fetcher = ImageFetcher([HOST], max_bytes=4096, timeout_s=5, resolver=Resolver(answer))
    [result] = fetch_all(fetcher, [url(image_server, "/img.png")])
    assert isinstance(result, InvalidInputApiError) and message in str(result)
    assert connects == [] and image_server.paths == []


def test_allow_private_still_connects_to_the_one_answer(image_server, connects):
    resolver = Resolver([LOOPBACK], [PUBLIC])
    fetcher = ImageFetcher([HOST], allow_private=True, max_bytes=4096, timeout_s=5, resolver=resolver)
    assert fetch_all(fetcher, [url(image_server, "/img.png")]) == [PNG]
    assert resolver.calls == [HOST] and connects == ["127.0.0.1"]
