"""What the security tests throw at the server: the route table, credentials that must not
work, path tricks, SSRF URLs, path-traversal names, and a local image host that records hits.
Shared by ``test_security.py`` and the soak runner."""

from __future__ import annotations

import contextlib
import re
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from service.http.app import create_app
from service.settings import Settings
from tests.conftest import b64, make_png
from tests.reliability.helpers import assert_clean_error, files_under, raw_http, raw_request
from tests.service.conftest import API_KEY, REPO


def route_table() -> list[tuple[str, str]]:
    """(method, path template) of every route the app serves, from its route table."""
    app = create_app(Settings(model="unused", data_dir="/nonexistent", api_key="k"))
    routes, stack = [], list(app.router.routes)
    while stack:
        route = stack.pop(0)
        if hasattr(route, "original_router"):  # an included router (FastAPI >= 0.16x)
            stack.extend(route.original_router.routes)
        elif hasattr(route, "routes"):
            stack.extend(route.routes)
        else:
            routes += [(method, route.path) for method in sorted(route.methods or ())]
    return routes


ROUTES = route_table()


def concrete(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", template)


# Credentials that must not open anything (the query string carries the key as well).
WRONG_CREDENTIALS = [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {API_KEY[:-1]}"},
    {"Authorization": f"Basic {b64(f'user:{API_KEY}'.encode())}"},
    {"X-API-Key": API_KEY},
    {"Authorization": f"Token {API_KEY}"},
]


BYPASS_TARGETS = [
    "/health/../info",
    "/health/%2e%2e/info",
    "/health%2F..%2Finfo",
    "/./info",
    "//info",
    "/info/",
    "/INFO",
    "/info;/health",
    "/info?/health",
    "/docs/../info",
    "/openapi.json/../collections",
    "/metrics/../v1/models",
    "http://127.0.0.1/info",
    "/health/x",
]


class ImageHost(BaseHTTPRequestHandler):
    """A local image server that counts every request it gets."""

    hits: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 (http.server's name)
        ImageHost.hits.append(self.path)
        port = self.server.server_address[1]
        png = make_png(24, 24)
        if self.path == "/img.png":
            self._send(200, png)
        elif self.path == "/to-other-host":
            self._redirect(f"http://127.0.0.1:{port}/img.png")
        elif self.path == "/to-metadata":
            self._redirect("http://169.254.169.254/latest/meta-data/")
        elif self.path.startswith("/chain"):
            n = int(self.path.removeprefix("/chain") or 0)
            self._redirect(f"/chain{n + 1}")
        elif self.path == "/huge":
            self._send(200, b"\0" * 50_000)
        elif self.path == "/drip":
            self.send_response(200)  # no length: the body ends when the connection closes
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass  # the fetcher gave up, as it should
        else:
            self._send(404, b"")

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


@contextlib.contextmanager
def image_host_server() -> Iterator[int]:
    """A local image host on a free port (its requests are recorded in ``ImageHost.hits``)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageHost)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()


SSRF_URLS = [
    "http://localhost:{port}/img.png",  # allow-listed, but loopback
    "HTTP://LOCALHOST:{port}/img.png",
    "http://sub.localhost:{port}/img.png",
    "http://127.0.0.1:{port}/img.png",
    "http://[::1]:{port}/img.png",
    "http://[::ffff:127.0.0.1]:{port}/img.png",
    "http://2130706433:{port}/img.png",
    "http://0x7f000001:{port}/img.png",
    "http://0177.0.0.1:{port}/img.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://localhost@127.0.0.1:{port}/img.png",
    "http://127.0.0.1:{port}#@localhost/img.png",
    "http://127.0.0.1:{port}\\@localhost/img.png",
    "file:///etc/passwd",
    "ftp://localhost:{port}/img.png",
    "gopher://localhost:{port}/_GET",
    "dict://localhost:{port}/",
]


def traversal_requests(token: str) -> list[tuple[str, str, dict | None]]:
    names = [
        "..",
        ".",
        "%2e%2e",
        "%2E%2E%2F%2E%2E%2Fetc",
        f"..%2F..%2F{token}",
        f"%2Ftmp%2F{token}",
        f"..%5C..%5C{token}",
        f"{token}%00.txt",
        "x" * 5000,
        "store.sqlite3",
        "store.lock",
        "-rf",
        "~root",
        f"$(touch%20%2Ftmp%2F{token})",
        "%EF%BD%85%EF%BD%96%EF%BD%89%EF%BD%8C",
        f"{token}%0A",
        "CON",
        "NUL",
    ]
    vector = {"documents": [{"id": "a", "vector": [1.0, 0.0]}]}
    out: list[tuple[str, str, dict | None]] = []
    for name in names:
        out += [
            ("PUT", f"/collections/{name}", {"dim": 2}),
            ("POST", f"/collections/{name}/documents", vector),
            ("GET", f"/collections/{name}", None),
            ("DELETE", f"/collections/{name}", None),
        ]
    for name in (f"../../{token}", f"/tmp/{token}", f"{token}\x00", "../store.sqlite3"):
        out.append(("POST", "/search", {"collection": name, "query": {"vector": [1.0, 0.0]}}))
    for doc_id in (f"../../../../tmp/{token}", f"/tmp/{token}", f"..\\..\\{token}", f"{token}\x00"):
        out.append(
            ("POST", "/collections/trav/documents", {"documents": [{"id": doc_id, "vector": [1.0, 0.0]}]})
        )
    for doc_path in (f"..%2F..%2F{token}", f"%2Ftmp%2F{token}", f"../../{token}", f"{token}%00"):
        out += [
            ("GET", f"/collections/trav/documents/{doc_path}", None),
            ("DELETE", f"/collections/trav/documents/{doc_path}", None),
        ]
    return out


# --- the checks -----------------------------------------------------------------------------------

# The routes open without the API key, written here rather than read from the server's own
# list: a private route added to that list by mistake must fail this check, not pass it.
PUBLIC_PATHS = frozenset(
    {
        "/health",
        "/ready",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/openapi.json",
        # the search page and its static files (it asks for the key itself)
        "/",
        "/page/index.html",
        "/page/app.js",
        "/page/style.css",
    }
)


def check_route_auth(url: str, auth: dict[str, str], method: str, template: str) -> int:
    """Every wrong credential gets 401 (unless the route is public); the right key opens it.
    Returns the number of requests sent."""
    path = concrete(template)
    body = {"json": {}} if method in ("POST", "PUT") else {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for headers in WRONG_CREDENTIALS:
            response = client.request(method, path, headers=headers, params={"api_key": API_KEY}, **body)
            if template in PUBLIC_PATHS:
                assert response.status_code < 400, (method, path, response.status_code)
            else:
                assert response.status_code == 401, (method, path, headers, response.status_code)
                assert response.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":  # no body to look at
                    assert assert_clean_error(response)["type"] == "unauthorized"
        right = client.request(method, path, headers=auth, **body)
        assert right.status_code != 401 and right.status_code < 500, (
            method,
            path,
            right.status_code,
            right.text[:200],
        )
    return len(WRONG_CREDENTIALS) + 1


def check_bypass(port: int, target: str) -> None:
    """A raw request line (no client-side normalisation) must not reach a protected route."""
    status, _, body = raw_http(port, raw_request("GET", target))
    assert status in (400, 401, 404), (target, status, body[:200])
    if status == 401:
        assert b'"unauthorized"' in body
    assert b'"dim"' not in body and b'"collections"' not in body  # nothing protected came back


def check_ssrf(url: str, template: str, image_port: int) -> int:
    """The URL is refused on every route that takes images, and nothing reaches the local host."""
    ImageHost.hits.clear()
    image_url = template.format(port=image_port)
    with httpx.Client(base_url=url, timeout=60) as client:
        for body in (
            {"inputs": [{"image": image_url}]},
            {"inputs": [{"content": [{"type": "text", "text": "a"}, {"type": "image", "image": image_url}]}]},
        ):
            assert_clean_error(client.post("/embed", json=body), {422})
        doc = {"documents": [{"id": "u", "image": image_url}]}
        assert_clean_error(client.post("/collections/ssrf/documents", json=doc), {422})
        assert_clean_error(client.post("/v1/embeddings", json={"input": [{"image": image_url}]}), {422})
    assert ImageHost.hits == [], f"{image_url} reached the local host: {ImageHost.hits}"
    return 4


def check_traversal(url: str, port: int, workdir: Path, public: tuple[str, ...] = ()) -> int:
    """Hostile collection names and ids: no 5xx, no file outside the store's own, anywhere.
    ``workdir`` holds the server's log and its data dir. Returns the number of requests sent."""
    token = f"escape-{uuid.uuid4().hex[:12]}"
    data_dir = workdir / "data"
    watched = {root: files_under(root) for root in (workdir, Path("/tmp"))}
    requests = traversal_requests(token)
    with httpx.Client(base_url=url, timeout=60) as client:
        seed = {"documents": [{"id": "seed", "vector": [0.0, 1.0]}]}
        assert client.post("/collections/trav/documents", json=seed).status_code == 200
        for method, path, body in requests:
            response = (
                client.request(method, path, json=body) if body is not None else client.request(method, path)
            )
            assert response.status_code < 500, (method, path, response.status_code, response.text[:200])
            if response.status_code >= 400:  # a message may echo the name it refuses
                assert_clean_error(response, public=(*public, f"/tmp/{token}"))
        for target in (f"/collections/../../{token}/documents", f"/collections/..%2f..%2f{token}/documents"):
            raw = raw_request(
                "POST", target, body=b'{"documents": []}', headers={"Content-Type": "application/json"}
            )
            status, _, _ = raw_http(port, raw)
            assert status in (404, 422), (target, status)
        names = [c["name"] for c in client.get("/collections").json()["collections"]]
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", n) for n in names), names
    # Only the store's own files in the data dir, nothing new beside it, nothing named after the token.
    store_files = {"store.sqlite3", "store.sqlite3-wal", "store.sqlite3-shm", "store.lock"}
    assert files_under(data_dir) <= store_files
    assert files_under(workdir) - watched[workdir] <= {f"data/{name}" for name in store_files}
    assert not [p for p in files_under(Path("/tmp")) - watched[Path("/tmp")] if token in p]
    assert not list(REPO.glob(f"*{token}*")) and not list(workdir.glob(f"**/*{token}*"))
    return len(requests) + 2
