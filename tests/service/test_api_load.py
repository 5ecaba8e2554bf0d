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
from tests.service.conftest import API_KEY, HOLD_BATCH, KILL_WORKER, start_server


def _wait_for(condition, server, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout  # a hang guard only
    while not condition():
        assert time.monotonic() < deadline, f"waited for {what}:\n{server.log()}"
        time.sleep(0.01)


def test_concurrent_requests_share_batches_and_get_their_own_vectors(server, tiny_embedder):
    # A held batch keeps the device busy until all 32 requests are preprocessed and sent:
    # the batcher then has them queued together, whatever the machine's speed.
    texts = [f"request number {i} " + "about shapes " * (i % 5) for i in range(32)]
    batches_before = server.metric("llave_batch_size_count")
    singles_before = server.metric("llave_batch_size_bucket", 'le="1.0"')
    inputs_before = server.metric("llave_batch_size_sum")
    preprocessed_before = server.metric("llave_stage_seconds_count", 'stage="preprocess"')

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            held = asyncio.create_task(client.post("/embed", json={"inputs": [{"text": HOLD_BATCH}]}))
            await asyncio.to_thread(server.gate.wait_entered, server)
            tasks = [
                asyncio.create_task(client.post("/embed", json={"inputs": [{"text": t}]})) for t in texts
            ]
            preprocessed = lambda: (  # noqa: E731
                server.metric("llave_stage_seconds_count", 'stage="preprocess"') >= preprocessed_before + 33
            )
            await asyncio.to_thread(_wait_for, preprocessed, server, "32 requests preprocessed")
            server.gate.open()
            assert (await held).status_code == 200
            return [await t for t in tasks]

    try:
        responses = asyncio.run(run())
    finally:
        server.gate.open()
        server.gate.reset()

    assert [r.status_code for r in responses] == [200] * 32
    got = np.asarray([r.json()["embeddings"][0] for r in responses], dtype=np.float32)
    np.testing.assert_allclose(got, tiny_embedder.embed([{"text": t} for t in texts]), atol=1e-5)

    batches = server.metric("llave_batch_size_count") - batches_before
    multi = batches - (server.metric("llave_batch_size_bucket", 'le="1.0"') - singles_before)
    assert server.metric("llave_batch_size_sum") - inputs_before == 33
    assert batches < 33 and multi >= 1  # forward passes carried several requests
    assert server.metric("llave_queue_inputs") == 0


def test_a_full_queue_answers_429_with_retry_after_and_the_server_stays_healthy(guarded_server):
    # --max-queue 8: while a request of 8 inputs is held on the device, every other request
    # is refused at once.
    srv = guarded_server
    image = b64(make_png(48, 48))
    body = {"inputs": [{"image": image, "text": f"input {i}"} for i in range(8)]}
    held_body = {"inputs": [{"text": HOLD_BATCH}, *body["inputs"][1:]]}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    refused_before = srv.metric("llave_requests_total", 'route="/embed",status="429"')

    async def run() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, headers=auth) as client:
            held = asyncio.create_task(client.post("/embed", json=held_body))
            await asyncio.to_thread(srv.gate.wait_entered, srv)
            refused = [await client.post("/embed", json=body) for _ in range(3)]
            srv.gate.open()
            return await held, refused

    try:
        held, refused = asyncio.run(run())
    finally:
        srv.gate.open()
        srv.gate.reset()
    assert held.status_code == 200, held.text
    for response in refused:
        assert response.status_code == 429, response.text
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "overloaded"
    with srv.client(headers=auth) as client:
        assert client.get("/health").status_code == 200
        assert client.post("/embed", json=body).status_code == 200
    assert srv.metric("llave_requests_total", 'route="/embed",status="429"') - refused_before == 3
    assert srv.metric("llave_queue_inputs") == 0


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
