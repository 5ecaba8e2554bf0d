"""End to end: every bad request gets its status and a JSON error body that leaks nothing."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from fastapi.testclient import TestClient

from service.http.app import create_app
from service.http.errors import ClientClosedRequestError
from service.http.routes.common import cancel_on_disconnect
from service.settings import Settings
from tests.conftest import b64, make_png
from tests.service.conftest import FAIL_BATCH

PNG = b64(make_png(16, 16))
LEAKS = ("Traceback", 'File "', ".py", "/work", "/tmp", "site-packages")


def assert_error(response, status: int, kind: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["type"], str) and isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    if kind is not None:
        assert body["error"]["type"] == kind, body
    for leak in LEAKS:
        assert leak not in body["error"]["message"], body
    return body["error"]


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def post_raw(client, path: str, data: bytes, content_type: str | None = "application/json"):
    headers = {"content-type": content_type} if content_type else {}
    return client.post(path, content=data, headers=headers)


# --- transport-level -------------------------------------------------------------------


def test_malformed_json_is_400(client):
    assert_error(post_raw(client, "/embed", b'{"inputs": [{"text": "a"}'), 400, "invalid_json")
    assert_error(post_raw(client, "/v1/embeddings", b"not json"), 400, "invalid_json")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_body_that_is_not_json_is_415(client, content_type):
    data = json.dumps({"inputs": [{"text": "a"}]}).encode()
    assert_error(post_raw(client, "/embed", data, content_type), 415, "unsupported_media_type")


def test_json_with_charset_is_accepted(client):
    data = json.dumps({"inputs": [{"text": "a"}]}).encode()
    assert post_raw(client, "/embed", data, "application/json; charset=utf-8").status_code == 200


def test_declared_oversized_body_is_413_before_reading(client):
    data = json.dumps({"inputs": [{"text": "x" * 400_000}]}).encode()
    assert_error(post_raw(client, "/embed", data), 413, "payload_too_large")


def test_chunked_oversized_body_is_413(client):
    def chunks():
        yield b'{"inputs": [{"text": "'
        for _ in range(40):
            yield b"y" * 10_000  # 400 kB in all, no Content-Length
        yield b'"}]}'

    response = client.post("/embed", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, "payload_too_large")


def test_chunked_body_under_the_limit_is_fine(client):
    def chunks():
        yield b'{"inputs": [{"text": '
        yield b'"chunked body"}]}'

    response = client.post("/embed", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_unknown_route_and_method_use_the_error_shape(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/embed"), 405, "method_not_allowed")


# --- schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [{"text": "a"}], "colour": "red"},  # unknown top-level field
        {"inputs": [{"text": "a", "colour": "red"}]},  # unknown input field
        {"inputs": [{"content": [{"type": "audio", "audio": "x"}]}]},
        {"inputs": "just a string"},
        {"inputs": [{"text": 5}]},
        {"inputs": [{"image": 12345}]},
        {"inputs": [{"text": "a"}], "normalize": "yes"},
        {"inputs": [{"text": "a", "content": [{"type": "text", "text": "b"}]}]},
        {},
    ],
)
def test_schema_violations_are_422(client, body):
    assert_error(client.post("/embed", json=body), 422, "invalid_request")


@pytest.mark.parametrize(
    "body",
    [{"inputs": []}, {"inputs": [{}]}, {"inputs": [{"text": ""}]}, {"inputs": [{"content": []}]}],
)
def test_empty_inputs_are_422(client, body):
    assert_error(client.post("/embed", json=body), 422)


@pytest.mark.parametrize(
    "body", [{"input": []}, {"input": [1, 2, 3]}, {"input": "x", "encoding_format": "int4"}]
)
def test_openai_bad_inputs_are_422(client, body):
    assert_error(client.post("/v1/embeddings", json=body), 422)


# --- inputs the model core refuses -----------------------------------------------------


def test_bad_base64_is_422_and_names_the_input(client):
    error = assert_error(
        client.post("/embed", json={"inputs": [{"text": "fine"}, {"image": "not base64 !!!"}]}),
        422,
        "invalid_input",
    )
    assert error["message"].startswith("input 1:")
    assert "base64" in error["message"]


def test_corrupt_image_is_422(client):
    garbage = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()
    truncated = b64(make_png(16, 16)[:40])
    for image in (garbage, truncated):
        assert_error(client.post("/embed", json={"inputs": [{"image": image}]}), 422, "invalid_input")


def test_image_over_the_pixel_limit_is_413(client):
    big = b64(make_png(120, 120))  # 14400 px > --max-image-pixels 10000
    assert_error(client.post("/embed", json={"inputs": [{"image": big}]}), 413, "payload_too_large")


def test_too_many_images_in_one_input_is_413(client):
    content = [{"type": "image", "image": PNG} for _ in range(3)]  # > --max-images-per-input 2
    assert_error(client.post("/embed", json={"inputs": [{"content": content}]}), 413, "payload_too_large")


def test_too_many_inputs_is_413(client):
    inputs = [{"text": f"t{i}"} for i in range(17)]  # > --max-inputs-per-request 16
    assert_error(client.post("/embed", json={"inputs": inputs}), 413, "payload_too_large")
    assert_error(client.post("/v1/embeddings", json={"input": [f"t{i}" for i in range(17)]}), 413)


def test_image_urls_are_refused_without_an_allow_list(client):
    for image in ("https://example.com/cat.png", "http://127.0.0.1:1/x.png"):
        error = assert_error(client.post("/embed", json={"inputs": [{"image": image}]}), 422, "invalid_input")
        assert "URL" in error["message"]
    content = [{"type": "text", "text": "a"}, {"type": "image", "image": "https://example.com/x.png"}]
    assert_error(client.post("/embed", json={"inputs": [{"content": content}]}), 422, "invalid_input")


# --- failures inside the server --------------------------------------------------------


def test_a_failing_batch_fails_only_its_requests_and_the_server_keeps_serving(server, client):
    before = server.metric("llave_requests_total", 'status="500"')
    error = assert_error(client.post("/embed", json={"inputs": [{"text": f"x {FAIL_BATCH}"}]}), 500)
    assert error["type"] == "inference_error"
    assert "injected" not in error["message"]  # the cause stays in the log
    assert server.metric("llave_requests_total", 'status="500"') == before + 1
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    assert client.post("/embed", json={"inputs": [{"text": "still here"}]}).status_code == 200
    log = server.log()
    assert "forward pass failed" in log and "Traceback" in log


def test_errors_are_counted_by_route_and_status(server, client):
    before = server.metric("llave_requests_total", 'route="/embed",status="422"')
    client.post("/embed", json={"inputs": []})
    assert server.metric("llave_requests_total", 'route="/embed",status="422"') == before + 1
    before = server.metric("llave_requests_total", 'route="unmatched",status="404"')
    client.get("/definitely-not-here")
    assert server.metric("llave_requests_total", 'route="unmatched",status="404"') == before + 1


# --- in process: a bug, a client that goes away -----------------------------------------


def test_a_bug_is_a_generic_500_that_leaks_nothing_and_is_logged(tmp_path, caplog):
    app = create_app(Settings(model="unused", data_dir=tmp_path))

    @app.get("/buggy")
    async def buggy():
        raise RuntimeError("secret detail in /srv/app/secret.py")

    @app.get("/buggy-value")
    async def buggy_value():
        raise ValueError("another secret /srv/x.py")

    with caplog.at_level("ERROR", logger="llave.errors"):
        for path in ("/buggy", "/buggy-value"):
            error = assert_error(TestClient(app).get(path), 500, "internal_error")
            assert "secret" not in error["message"]
    assert "secret detail" in caplog.text  # the trace went to the log
    metrics = TestClient(app).get("/metrics").text
    assert 'llave_requests_total{route="/buggy",status="500"} 1.0' in metrics


def test_refusals_before_routing_are_counted_under_their_route(tmp_path):
    app = create_app(Settings(model="unused", data_dir=tmp_path, api_key="k"))
    client = TestClient(app)
    assert client.post("/embed", json={"inputs": [{"text": "a"}]}).status_code == 401
    metrics = client.get("/metrics").text
    assert 'llave_requests_total{route="/embed",status="401"} 1.0' in metrics


def test_a_client_that_goes_away_cancels_its_work():
    class GoneRequest:
        async def receive(self):
            await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

    async def main():
        started = asyncio.Event()

        async def work():
            started.set()
            await asyncio.sleep(60)

        task = asyncio.ensure_future(cancel_on_disconnect(GoneRequest(), work()))
        await started.wait()
        with pytest.raises(ClientClosedRequestError):
            await task

    asyncio.run(main())
