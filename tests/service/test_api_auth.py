"""API key on (the guarded server) and off (the main server); CORS only when configured."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.http.app import create_app
from service.settings import Settings
from tests.service.conftest import API_KEY

PUBLIC = ["/health", "/ready", "/metrics", "/docs", "/openapi.json"]
PROTECTED_GET = ["/info", "/v1/models"]


def test_without_a_key_configured_nothing_needs_one(server):
    with server.client() as client:
        for path in PUBLIC + PROTECTED_GET:
            assert client.get(path).status_code == 200, path
        assert client.post("/embed", json={"inputs": [{"text": "a"}]}).status_code == 200


def test_public_endpoints_need_no_key(guarded_server):
    with guarded_server.client() as client:
        for path in PUBLIC:
            assert client.get(path).status_code == 200, path


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": API_KEY},
        {"Authorization": f"Bearer {API_KEY}x"},
        {"Authorization": "Bearer"},
    ],
)
def test_protected_endpoints_refuse_a_missing_or_wrong_key(guarded_server, headers):
    with guarded_server.client(headers=headers) as client:
        for response in (
            client.get("/info"),
            client.get("/v1/models"),
            client.post("/embed", json={"inputs": [{"text": "a"}]}),
            client.post("/v1/embeddings", json={"input": "a"}),
            client.get("/collections"),  # routes added later are covered too
        ):
            assert response.status_code == 401, response.request.url
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["type"] == "unauthorized"


def test_the_right_key_opens_everything(guarded_server):
    with guarded_server.client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        for path in PROTECTED_GET:
            assert client.get(path).status_code == 200, path
        assert client.post("/embed", json={"inputs": [{"text": "a"}]}).status_code == 200
        assert client.post("/v1/embeddings", json={"input": "a"}).status_code == 200
        assert client.get("/info").json()["auth"] is True
    with guarded_server.client(headers={"Authorization": f"bearer   {API_KEY}"}) as client:
        assert client.get("/info").status_code == 200  # the scheme is case-insensitive


def test_openapi_documents_the_bearer_scheme(guarded_server):
    with guarded_server.client() as client:
        spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_cors_is_off_unless_origins_are_configured(tmp_path):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    off = TestClient(create_app(Settings(model="unused", data_dir=tmp_path)))
    response = off.get("/health", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers

    on = TestClient(
        create_app(
            Settings(model="unused", data_dir=tmp_path, cors_origins="https://app.example", api_key="k")
        )
    )
    response = on.options("/embed", headers=preflight)
    assert response.status_code == 200  # the preflight needs no key
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    response = on.get("/info", headers={"Origin": "https://app.example"})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    response = on.options("/embed", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
