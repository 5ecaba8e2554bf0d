"""Memory bounded by bytes: decoded pixels, buffered bodies, /search answers, and the
limit of documents that bring their own vector. One real server (the fault-injection
launcher, ``tests/service/faults.py``) whose ``hold-batch`` gate keeps a request in flight
for as long as a test needs: every wait here is on an event (a file, a metric), never a
timer."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from tests.conftest import b64, make_png
from tests.service.conftest import HOLD_BATCH, Gate, start_server

# The tiny checkpoint's crops are 64 px and its largest grid 2x2: one image decodes to at most
# 1 + 4 crops of 3 x 64 x 64 float32.
CROP_BYTES = 3 * 64 * 64 * 4
IMAGE_BOUND = 5 * CROP_BYTES  # 245,760
PIXEL_BUDGET = 4 * IMAGE_BOUND  # four images' worth in flight per front end
MAX_BODY = 150_000
BODY_BUDGET = 200_000
SEARCH_BYTES = 20_000


@pytest.fixture(scope="module")
def bounded(tiny_checkpoint, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("server-bounded")
    gate = Gate(workdir / "gate")
    srv = start_server(
        tiny_checkpoint,
        workdir,
        "--api-workers", "1",  # one front end: one pixel budget, one body budget
        "--max-pixel-bytes", str(PIXEL_BUDGET),
        "--max-body-bytes", str(MAX_BODY),
        "--max-buffered-body-bytes", str(BODY_BUDGET),
        "--max-search-response-bytes", str(SEARCH_BYTES),
        "--max-inputs-per-request", "4",
        "--max-vector-documents-per-request", "1000",
        "--max-input-tokens", "512",
        env={"TEST_LLAVE_FAULTS": f"hold-batch:{HOLD_BATCH}", **gate.env},
    )  # fmt: skip
    srv.gate = gate
    yield srv
    gate.open()
    srv.stop()


def wait_for(condition, server, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` (an event the server makes visible); the timeout only turns a
    hang into a failure with the server's log."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited for {what}:\n{server.log()}"
        time.sleep(0.02)


def image_input(n: int, text: str = "a picture") -> dict:
    png = b64(make_png(128, 128))  # 2x2 crops of 64 plus the base crop: the bound, exactly
    return {"content": [{"type": "text", "text": text}, *({"type": "image", "image": png} for _ in range(n))]}


def test_info_shows_the_byte_limits(bounded):
    limits = httpx.get(bounded.url + "/info").json()["limits"]
    assert limits["max_pixel_bytes"] == PIXEL_BUDGET
    assert limits["max_buffered_body_bytes"] == BODY_BUDGET
    assert limits["max_search_response_bytes"] == SEARCH_BYTES
    assert limits["max_vector_documents_per_request"] == 1000
    assert limits["max_k_with_sources"] == 100


def test_images_that_could_never_fit_the_pixel_budget_are_413(bounded):
    r = httpx.post(bounded.url + "/embed", json={"inputs": [image_input(5)]}, timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "payload_too_large"
    assert "--max-pixel-bytes" in r.json()["error"]["message"]
    # Four images fit (the budget is exactly their bound).
    r = httpx.post(bounded.url + "/embed", json={"inputs": [image_input(4)]}, timeout=60)
    assert r.status_code == 200, r.text


def test_a_full_pixel_budget_answers_429_and_frees_what_it_held(bounded):
    async def run() -> None:
        async with httpx.AsyncClient(base_url=bounded.url, timeout=120) as client:
            held = asyncio.create_task(client.post("/embed", json={"inputs": [image_input(3, HOLD_BATCH)]}))
            # In the engine's forward: its three images' crops are held (decoded, in shared memory).
            await asyncio.to_thread(bounded.gate.wait_entered, bounded)
            assert bounded.metric("llave_pixel_bytes") == 3 * IMAGE_BOUND
            refused = await client.post("/embed", json={"inputs": [image_input(2)]})
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["type"] == "overloaded"
            assert int(refused.headers["retry-after"]) >= 0
            # Text costs no pixels: still admitted while the images wait.
            text = asyncio.create_task(client.post("/embed", json={"inputs": [{"text": "no image"}]}))
            bounded.gate.open()
            assert (await held).status_code == 200
            assert (await text).status_code == 200
            again = await client.post("/embed", json={"inputs": [image_input(2)]})
            assert again.status_code == 200, again.text

    try:
        asyncio.run(run())
    finally:
        bounded.gate.open()
        bounded.gate.reset()
    assert bounded.metric("llave_pixel_bytes") == 0


def test_bodies_held_at_once_are_bounded_by_bytes(bounded):
    # A client that sends headers and part of a large body holds its declared length.
    host, port = "127.0.0.1", bounded.port
    declared = 120_000
    with socket.create_connection((host, port)) as slow:
        slow.sendall(
            b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {declared}\r\n\r\n".encode()
            + b'{"inputs": [{"text": "'
        )
        wait_for(lambda: bounded.metric("llave_body_bytes") >= declared, bounded, "the slow body")
        big = {"inputs": [{"text": "x" * 100_000}]}  # fits max-body-bytes, not the budget's rest
        r = httpx.post(bounded.url + "/embed", json=big, timeout=60)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["type"] == "overloaded"
        assert "retry-after" in r.headers
        small = httpx.post(bounded.url + "/embed", json={"inputs": [{"text": "small"}]}, timeout=60)
        assert small.status_code == 200, small.text  # what fits is still served
        slow.sendall(b"y" * (declared - 22 - 4) + b'"}]}')
        answer = slow.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    wait_for(lambda: bounded.metric("llave_body_bytes") == 0, bounded, "the bodies to be released")
    r = httpx.post(bounded.url + "/embed", json=big, timeout=60)
    assert r.status_code == 200, r.text


def test_documents_with_their_own_vector_have_their_own_limit(bounded):
    with bounded.client() as client:
        assert client.put("/collections/vectors-only", json={"dim": 4}).status_code == 200
        docs = [{"id": f"v{i}", "vector": [1.0, i % 7, 0.5, -1.0]} for i in range(1000)]
        r = client.post("/collections/vectors-only/documents", json={"documents": docs})
        assert r.status_code == 200, r.text  # 1,000 documents: far over max-inputs-per-request (4)
        assert r.json()["count"] == 1000
        docs.append({"id": "v1000", "vector": [1.0, 0.0, 0.0, 0.0]})
        r = client.post("/collections/vectors-only/documents", json={"documents": docs})
        assert r.status_code == 413, r.text
        assert "1001 documents with a vector" in r.json()["error"]["message"]
        # Documents to embed still count against max-inputs-per-request.
        texts = [{"id": f"t{i}", "text": f"text {i}"} for i in range(5)]
        assert (
            client.post("/collections/vectors-only/documents", json={"documents": texts}).status_code == 413
        )
        assert client.get("/collections/vectors-only").json()["count"] == 1000


def test_search_answers_with_sources_are_bounded(bounded):
    with bounded.client() as client:
        assert client.put("/collections/sourced", json={}).status_code == 200
        docs = [{"id": f"d{i}", "text": f"{i} " + "long text " * 600} for i in range(4)]  # ~6 KB each
        assert client.post("/collections/sourced/documents", json={"documents": docs}).status_code == 200
        query = {"collection": "sourced", "query": {"text": "long text"}, "include": ["text"]}
        ok = client.post("/search", json={**query, "k": 3})
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["hits"]) == 3
        too_big = client.post("/search", json={**query, "k": 4})
        assert too_big.status_code == 413, too_big.text
        assert "--max-search-response-bytes" in too_big.json()["error"]["message"]
        many = client.post("/search", json={**query, "k": 101})
        assert many.status_code == 413, many.text
        assert "at most 100 hits" in many.json()["error"]["message"]
        # Without sources k goes to MAX_K as before.
        plain = client.post("/search", json={**query, "include": [], "k": 1000})
        assert plain.status_code == 200
        assert len(plain.json()["hits"]) == 4
