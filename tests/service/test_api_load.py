"""End to end under load and faults: batches form, overload is refused early, the server survives."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.http.app import create_app
from service.settings import Settings
from tests.conftest import b64, make_png
from tests.service.conftest import API_KEY, KILL_WORKER, start_server


async def _post_all(
    url: str, path: str, bodies: list[dict], headers: dict | None = None
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, headers=headers) as client:
        return await asyncio.gather(*(client.post(path, json=body) for body in bodies))


def test_concurrent_requests_share_batches_and_get_their_own_vectors(server, tiny_embedder):
    texts = [f"request number {i} " + "about shapes " * (i % 5) for i in range(32)]
    batches_before = server.metric("llave_batch_size_count")
    singles_before = server.metric("llave_batch_size_bucket", 'le="1.0"')
    inputs_before = server.metric("llave_batch_size_sum")

    responses = asyncio.run(_post_all(server.url, "/embed", [{"inputs": [{"text": t}]} for t in texts]))

    assert [r.status_code for r in responses] == [200] * 32
    got = np.asarray([r.json()["embeddings"][0] for r in responses], dtype=np.float32)
    np.testing.assert_allclose(got, tiny_embedder.embed([{"text": t} for t in texts]), atol=1e-5)

    batches = server.metric("llave_batch_size_count") - batches_before
    multi = batches - (server.metric("llave_batch_size_bucket", 'le="1.0"') - singles_before)
    assert server.metric("llave_batch_size_sum") - inputs_before == 32
    assert batches < 32 and multi >= 1  # at least one forward pass carried several requests
    assert server.metric("llave_queue_inputs") == 0


def test_a_full_queue_answers_429_with_retry_after_and_the_server_stays_healthy(guarded_server):
    # --max-queue 8 and 8 inputs per request: while one request is being preprocessed or
    # queued, every other one must be refused at once.
    image = b64(make_png(48, 48))
    body = {"inputs": [{"image": image, "text": f"input {i}"} for i in range(8)]}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    refused: list[httpx.Response] = []
    for _ in range(5):  # each round is very likely to overload; a few rounds make it certain
        responses = asyncio.run(_post_all(guarded_server.url, "/embed", [body] * 24, headers=auth))
        statuses = {r.status_code for r in responses}
        assert statuses <= {200, 429}, statuses
        assert 200 in statuses
        refused = [r for r in responses if r.status_code == 429]
        if refused:
            break
    assert refused, "no request was refused"
    for response in refused:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "overloaded"
    with guarded_server.client(headers=auth) as client:
        assert client.get("/health").status_code == 200
        assert client.post("/embed", json=body).status_code == 200
    assert guarded_server.metric("llave_requests_total", 'route="/embed",status="429"') >= len(refused)
    assert guarded_server.metric("llave_queue_inputs") == 0


def test_a_dead_engine_is_restarted_then_the_server_gives_up(tiny_checkpoint, tmp_path):
    """The engine process dies (its device thread hit an unrecoverable error): the request
    that killed it gets 503, /health turns 503 at once, the supervisor starts a new engine
    and the server serves again; when the restarts are spent the server exits non-zero."""
    server = start_server(
        tiny_checkpoint,
        tmp_path,
        "--max-batch-size",
        "4",
        "--engine-restarts",
        "1",
        env={"TEST_LLAVE_FAULTS": f"kill-worker:{KILL_WORKER}"},
    )
    try:
        with server.client() as client:
            assert client.get("/health").status_code == 200
            assert client.post("/embed", json={"inputs": [{"text": "fine"}]}).status_code == 200
            killed = client.post("/embed", json={"inputs": [{"text": KILL_WORKER}]})
            assert killed.status_code == 503 and killed.json()["error"]["type"] == "unavailable"
            health = client.get("/health")
            assert health.status_code == 503, health.text
            assert health.json()["error"]["type"] == "unavailable"
            assert client.get("/ready").status_code == 503
            refused = client.post("/embed", json={"inputs": [{"text": "fine"}]})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            deadline = time.monotonic() + 120
            while client.get("/ready").status_code != 200:
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.1)
            again = client.post("/embed", json={"inputs": [{"text": "fine"}]})
            assert again.status_code == 200
            assert server.metric("llave_worker_alive") == 1
            last = client.post("/embed", json={"inputs": [{"text": KILL_WORKER}]})
            assert last.status_code == 503
        assert server.proc.wait(timeout=60) == 1
        log = server.log()
        assert "restarting it (1 of at most 1)" in log
        assert "giving up" in log
    finally:
        server.stop()


def test_a_request_past_its_timeout_gets_503_and_its_work_is_dropped(tiny_checkpoint, tmp_path):
    # In process, with the real model: a timeout far below any possible latency.
    settings = Settings(
        model=str(tiny_checkpoint), data_dir=tmp_path, request_timeout_s=1e-6, max_batch_size=2
    )
    with TestClient(create_app(settings)) as client:
        for _ in range(600):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        assert client.get("/ready").status_code == 200
        response = client.post("/embed", json={"inputs": [{"text": "too slow"}, {"text": "also"}]})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "within" in response.json()["error"]["message"]
        metrics = client.get("/metrics").text
    assert "llave_batch_size_count 0.0" in metrics  # dropped before reaching the device
    assert "llave_queue_inputs 0.0" in metrics


@pytest.mark.parametrize("path", ["/embed", "/v1/embeddings"])
def test_not_ready_answers_503_with_retry_after(tiny_checkpoint, tmp_path, path):
    # Before the lifespan has loaded anything (no model at all), embedding is refused cleanly.
    app = create_app(Settings(model=str(tiny_checkpoint), data_dir=tmp_path))
    client = TestClient(app)  # no `with`: the lifespan (and the model load) never starts
    body = {"inputs": [{"text": "a"}]} if path == "/embed" else {"input": "a"}
    response = client.post(path, json=body)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "unavailable"
    assert client.get("/health").status_code == 200  # alive: it is only starting
    assert client.get("/ready").status_code == 503
