"""Remote image URLs: refused by default; allow-listed hosts fetched with limits (local HTTP server)."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from fastapi.testclient import TestClient

from model.errors import ImageTooLargeError as PayloadTooLargeError
from model.errors import InvalidInputError as InvalidInputApiError
from service.http.app import create_app
from service.inference.images import ImageFetcher, _public, host_allowed
from service.settings import Settings
from tests.conftest import make_png

PNG = make_png(32, 24, (10, 200, 10))


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):  # noqa: N802 (http.server's name)
        port = self.server.server_address[1]
        routes = {
            "/img.png": lambda: self._send(200, PNG),
            "/big": lambda: self._send(200, b"\0" * 5000),
            "/big-chunked": self._chunked,
            "/missing": lambda: self._send(404, b"no"),
            "/same-host": lambda: self._redirect("/img.png"),
            "/other-host": lambda: self._redirect(f"http://localhost:{port}/img.png"),
            "/loop": lambda: self._redirect("/loop"),
            "/slow": self._slow,
        }
        routes.get(self.path, lambda: self._send(404, b""))()

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _chunked(self):
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(10):
            self.wfile.write(b"400\r\n" + b"\0" * 0x400 + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def _slow(self):
        time.sleep(2)
        try:
            self._send(200, PNG)
        except BrokenPipeError:  # the fetcher gave up, as it should
            pass


@pytest.fixture(scope="module")
def image_host():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def fetcher(allow_hosts=("127.0.0.1",), **kwargs) -> ImageFetcher:
    options = {"allow_private": True, "max_bytes": 4096, "timeout_s": 5.0, **kwargs}
    return ImageFetcher(list(allow_hosts), **options)


def resolve(f: ImageFetcher, inputs):
    async def go():
        try:
            return await f.resolve_inputs(inputs)
        finally:
            await f.aclose()

    return asyncio.run(go())


def test_urls_are_refused_without_an_allow_list(image_host):
    with pytest.raises(InvalidInputApiError) as exc:
        resolve(ImageFetcher([]), [{"text": "a"}, {"image": image_host + "/img.png"}])
    assert exc.value.input_index == 1


def test_allowed_url_is_replaced_by_its_bytes(image_host):
    inputs = [
        {"image": image_host + "/img.png", "text": "t"},
        {"content": [{"type": "image", "image": image_host + "/same-host"}, {"type": "text", "text": "x"}]},
        {"image": "aGVsbG8="},  # base64 stays as it is
    ]
    out = resolve(fetcher(), inputs)
    assert out[0] == {"image": PNG, "text": "t"}
    assert out[1]["content"][0]["image"] == PNG
    assert out[2] == inputs[2]


@pytest.mark.parametrize(
    ("path", "kwargs", "error"),
    [
        ("/img.png", {"allow_hosts": ["images.example.com"]}, InvalidInputApiError),
        ("/img.png", {"allow_private": False}, InvalidInputApiError),  # loopback
        ("/other-host", {"allow_hosts": ["127.0.0.1", "localhost"]}, InvalidInputApiError),
        ("/loop", {}, InvalidInputApiError),
        ("/missing", {}, InvalidInputApiError),
        ("/big", {}, PayloadTooLargeError),
        ("/big-chunked", {}, PayloadTooLargeError),
        ("/slow", {"timeout_s": 0.2}, InvalidInputApiError),
    ],
)
def test_refused_urls(image_host, path, kwargs, error):
    with pytest.raises(error):
        resolve(fetcher(**kwargs), [{"image": image_host + path}])


def test_host_patterns():
    allow = ["images.example.com", "*.cdn.example"]
    assert host_allowed("images.example.com", allow)
    assert host_allowed("IMAGES.example.com.", allow)
    assert host_allowed("a.b.cdn.example", allow)
    assert not host_allowed("cdn.example", allow)
    assert not host_allowed("evil-cdn.example", allow)
    assert not host_allowed("images.example.com.evil", allow)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("fe80::1", False),
        ("224.0.0.1", False),
        ("2001:4860:4860::8888", True),
    ],
)
def test_only_public_addresses_pass(address, public):
    assert _public(ipaddress.ip_address(address)) is public


def test_embedding_an_allowed_url_equals_embedding_its_bytes(
    image_host, tiny_checkpoint, tiny_embedder, tmp_path
):
    settings = Settings(
        model=str(tiny_checkpoint),
        data_dir=tmp_path,
        image_url_allow_hosts="127.0.0.1",
        image_url_allow_private=True,
        image_url_max_bytes=4096,
        max_batch_size=2,
    )
    with TestClient(create_app(settings)) as client:
        for _ in range(600):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        response = client.post("/embed", json={"inputs": [{"image": image_host + "/img.png", "text": "t"}]})
        assert response.status_code == 200, response.text
        refused = client.post("/embed", json={"inputs": [{"image": image_host + "/big"}]})
        assert refused.status_code == 413
    expected = tiny_embedder.embed([{"image": PNG, "text": "t"}])
    np.testing.assert_allclose(np.asarray(response.json()["embeddings"]), expected, atol=1e-5)
