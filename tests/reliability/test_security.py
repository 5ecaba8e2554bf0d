"""Who gets in, what leaks out: the API key on every route, no traces or paths in errors, image
URLs (SSRF), names and ids that cannot escape the data directory, CORS only when configured."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from service.http.app import create_app
from service.settings import Settings
from tests.reliability.attacks import (
    BYPASS_TARGETS,
    ROUTES,
    SSRF_URLS,
    ImageHost,
    check_bypass,
    check_route_auth,
    check_ssrf,
    check_traversal,
    concrete,
    image_host_server,
)
from tests.reliability.helpers import assert_clean_error, raw_http
from tests.reliability.servers import CORS_ORIGIN
from tests.service.conftest import API_KEY

# --- the API key on every route -------------------------------------------------------------


def test_the_route_table_is_what_the_schema_documents(keyed_server):
    spec = httpx.get(keyed_server.url + "/openapi.json", timeout=30).json()
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    served = {(m, re.sub(r":\w+}", "}", p)) for m, p in ROUTES if m != "HEAD"}  # {x:path} -> {x}
    undocumented = served - documented
    assert undocumented <= {
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/docs/oauth2-redirect"),
        ("GET", "/redoc"),
    }
    assert documented <= served


@pytest.mark.parametrize(("method", "template"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_every_route_needs_the_key_unless_public(keyed_server, method, template):
    check_route_auth(keyed_server.url, keyed_server.auth, method, template)


@pytest.mark.parametrize("target", BYPASS_TARGETS)
def test_path_tricks_do_not_bypass_the_key(keyed_server, target):
    check_bypass(keyed_server.port, target)


@pytest.mark.parametrize(
    "headers",
    [
        {
            "Authorization": "Bearer wrong",
            "authorization": f"Bearer {API_KEY}",
        },  # two headers: the first counts
        {"Authorization": f"Bearer {API_KEY}\x00"},
        {"Authorization": f"Bearer {API_KEY} extra"},
        {"Authorization": "Bearer " + "k" * 60_000},
        {"Proxy-Authorization": f"Bearer {API_KEY}"},
        {"Cookie": f"api_key={API_KEY}"},
    ],
    ids=["duplicate-header", "nul-suffix", "extra-token", "huge-key", "proxy-authorization", "cookie"],
)
def test_malformed_credentials_are_refused(keyed_server, headers):
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET /info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{lines}\r\n".encode("latin-1")
    status, _, body = raw_http(keyed_server.port, request)
    assert status in (400, 401, 431), (status, body[:200])
    assert b'"dim"' not in body


# --- errors leak nothing ------------------------------------------------------------------------


BAD_BODIES = [
    (b'{"broken": ', "application/json"),
    (b'{"unexpected": [1, 2, {"deep": null}]}', "application/json"),
    (b"<xml/>", "application/xml"),
    (b"\xff\xfe\x00garbage", "application/json"),
    (b'"just a string"', "application/json"),
]


@pytest.mark.parametrize(("method", "template"), [r for r in ROUTES if r[0] in ("POST", "PUT")])
def test_bad_bodies_on_every_route_get_clean_errors(rel_server, method, template):
    with rel_server.client() as client:
        for data, content_type in BAD_BODIES:
            response = client.request(
                method, concrete(template), content=data, headers={"content-type": content_type}
            )
            assert_clean_error(response, {400, 415, 422}, public=(rel_server.model_name,))


def test_wrong_methods_and_unknown_things_get_clean_errors(rel_server):
    with rel_server.client() as client:
        for method, template in ROUTES:
            other = "DELETE" if method in ("GET", "HEAD") else "PATCH"
            if (other, template) not in ROUTES:
                assert_clean_error(client.request(other, concrete(template)), {405})
        for path in (
            "/nope",
            "/collections/none",
            "/collections/none/documents/x",
            "/v2/embeddings",
            "/.env",
            "/../../etc/passwd",
        ):
            assert_clean_error(client.get(path), {404})
        assert_clean_error(
            client.post("/search", json={"collection": "none", "query": {"vector": [1.0]}}), {404}
        )
        assert client.put("/collections/conflict", json={"dim": 4}).status_code == 200
        assert_clean_error(client.put("/collections/conflict", json={"dim": 8}), {409})


# --- image URLs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_host():
    with image_host_server() as port:
        yield port


def _embed_url(client, url: str):
    return client.post("/embed", json={"inputs": [{"image": url, "text": "x"}]})


def test_image_urls_are_off_by_default(keyed_server, image_host):
    ImageHost.hits.clear()
    with httpx.Client(base_url=keyed_server.url, headers=keyed_server.auth, timeout=60) as client:
        for url in (f"http://localhost:{image_host}/img.png", f"http://127.0.0.1:{image_host}/img.png"):
            error = assert_clean_error(_embed_url(client, url), {422})
            assert "URL" in error["message"]
    assert ImageHost.hits == []


@pytest.mark.parametrize("template", SSRF_URLS)
def test_image_urls_cannot_reach_private_addresses(rel_server, image_host, template):
    """rel_server allows ``localhost`` and ``*.localhost`` but not private addresses."""
    check_ssrf(rel_server.url, template, image_host)


def test_allowed_image_urls_keep_to_their_host_size_and_time(tiny_checkpoint, tmp_path, image_host):
    settings = Settings(
        model=str(tiny_checkpoint),
        data_dir=tmp_path,
        image_url_allow_hosts="localhost",
        image_url_allow_private=True,  # the local test host is loopback
        image_url_max_bytes=20_000,
        image_url_timeout_s=1.0,
    )
    base = f"http://localhost:{image_host}"
    with TestClient(create_app(settings)) as client:
        for _ in range(600):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        ImageHost.hits.clear()
        assert _embed_url(client, base + "/img.png").status_code == 200
        assert_clean_error(_embed_url(client, base + "/to-other-host"), {422})
        assert_clean_error(_embed_url(client, base + "/to-metadata"), {422})
        assert_clean_error(_embed_url(client, base + "/chain"), {422})
        assert_clean_error(_embed_url(client, base + "/huge"), {413})
        started = time.monotonic()
        assert_clean_error(_embed_url(client, base + "/drip"), {422})
        assert time.monotonic() - started < 10  # the 1 s limit is on the whole fetch, not per read
        assert_clean_error(_embed_url(client, f"http://127.0.0.1:{image_host}/img.png"), {422})
    # Redirects were not followed to the other host (127.0.0.1 is not allow-listed), and the
    # chain stopped after a few hops.
    assert ImageHost.hits.count("/img.png") == 1
    assert len([h for h in ImageHost.hits if h.startswith("/chain")]) <= 4


# --- names and ids cannot escape the data directory ----------------------------------------------


def test_names_and_ids_cannot_escape_the_data_dir(rel_server):
    check_traversal(
        rel_server.url, rel_server.port, rel_server.log_path.parent, public=(rel_server.model_name,)
    )


# --- CORS ---------------------------------------------------------------------------------------


def test_cors_is_off_by_default(rel_server):
    origin = {"Origin": "https://app.example"}
    preflight = {
        **origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    with rel_server.client() as client:
        responses = [
            client.get("/health", headers=origin),
            client.post("/embed", json={"inputs": [{"text": "a"}]}, headers=origin),
            client.post("/embed", json={}, headers=origin),
            client.options("/embed", headers=preflight),
            client.options("/collections", headers=preflight),
        ]
    for response in responses:
        assert not any(h.startswith("access-control-") for h in response.headers), response.headers
    assert responses[3].status_code in (404, 405)


def test_cors_with_origins_allows_exactly_those(keyed_server):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        allowed = client.options("/embed", headers={**preflight, "Origin": CORS_ORIGIN})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == CORS_ORIGIN
        assert "access-control-allow-credentials" not in allowed.headers
        for origin in (
            "https://evil.example",
            "null",
            CORS_ORIGIN + ".evil.example",
            "http://app.example",
            "*",
        ):
            refused = client.options("/embed", headers={**preflight, "Origin": origin})
            assert refused.headers.get("access-control-allow-origin") in (None, ""), origin
            simple = client.get("/health", headers={"Origin": origin})
            assert "access-control-allow-origin" not in simple.headers, origin
        # An error answer (no key) still carries CORS for the allowed origin, so a browser app can read it.
        unauthorized = client.get("/info", headers={"Origin": CORS_ORIGIN})
        assert unauthorized.status_code == 401
        assert unauthorized.headers["access-control-allow-origin"] == CORS_ORIGIN
