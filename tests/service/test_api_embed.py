"""End to end: the real server (subprocess, tiny checkpoint) against the model core itself."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.conftest import b64, make_png
from tests.tolerance import assert_close_scaled

ATOL = 1e-5  # batched (padded) vs reference forward passes differ by kernel rounding only


@pytest.fixture(scope="module")
def sample_inputs():
    red = b64(make_png(40, 30, (200, 30, 30)))
    blue = b64(make_png(24, 48, (20, 40, 220)))
    return [
        {"text": "a photo of a cat"},
        {"image": red},
        {"image": blue, "text": "What is in the image"},
        {
            "content": [
                {"type": "text", "text": "compare "},
                {"type": "image", "image": red},
                {"type": "text", "text": " with "},
                {"type": "image", "image": blue},
            ]
        },
        {"text": "a red square", "instruction": "Represent the given text for retrieval:"},
        {
            "image": red,
            "text": "What colour is it",
            "instruction": "Represent the given image with the following question:",
        },
    ]


def test_readiness_went_from_503_to_200_while_loading(server):
    seen = [s for s in server.readiness if s is not None]
    assert seen[0] == 503, server.readiness  # answering while the model loads
    assert seen[-1] == 200
    first_ready = seen.index(200)
    assert all(s == 503 for s in seen[:first_ready]) and all(s == 200 for s in seen[first_ready:])


def test_embed_equals_the_model_core(server, tiny_embedder, sample_inputs):
    expected = tiny_embedder.embed(sample_inputs)
    with server.client() as client:
        response = client.post("/embed", json={"inputs": sample_inputs})
    assert response.status_code == 200, response.text
    body = response.json()
    got = np.asarray(body["embeddings"], dtype=np.float32)
    assert got.shape == expected.shape == (len(sample_inputs), tiny_embedder.dim)
    np.testing.assert_allclose(got, expected, atol=ATOL)
    assert body["dim"] == tiny_embedder.dim
    assert body["model"] == server_model_name(server)
    usage = body["usage"]
    assert usage["images"] == 5 and usage["truncated"] == 0
    assert (
        usage["prompt_tokens"]
        == usage["total_tokens"]
        == sum(tiny_embedder.preprocess(x).cost for x in sample_inputs)
    )
    for stage in ("preprocess", "queue", "inference"):
        assert float(response.headers[f"x-llave-{stage}-ms"]) >= 0


def test_each_input_alone_equals_the_batch(server, tiny_embedder, sample_inputs):
    with server.client() as client:
        rows = [client.post("/embed", json={"inputs": [x]}).json()["embeddings"][0] for x in sample_inputs]
    np.testing.assert_allclose(
        np.asarray(rows, dtype=np.float32), tiny_embedder.embed(sample_inputs), atol=ATOL
    )


def test_normalize_false_returns_the_pooled_state(server, tiny_embedder, sample_inputs):
    with server.client() as client:
        response = client.post("/embed", json={"inputs": sample_inputs[:3], "normalize": False})
    got = np.asarray(response.json()["embeddings"], dtype=np.float32)
    # Not unit vectors (elements up to ~3, norms ~8): a tolerance relative to their magnitude.
    assert_close_scaled(got, tiny_embedder.embed(sample_inputs[:3], normalize=False), rtol=1e-5, what="raw")
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_truncation_is_reported_or_refused(server):
    long_text = "word " * 2000  # far over --max-input-tokens 512
    with server.client() as client:
        cut = client.post("/embed", json={"inputs": [{"text": long_text}]})
        refused = client.post("/embed", json={"inputs": [{"text": long_text}], "truncate": False})
    assert cut.status_code == 200
    assert cut.json()["usage"]["truncated"] == 1 and cut.json()["usage"]["prompt_tokens"] == 512
    assert refused.status_code == 413
    assert refused.json()["error"]["type"] == "payload_too_large"


def test_openai_embeddings_float_and_base64(server, tiny_embedder, sample_inputs):
    texts = ["first text", "second, longer text about shapes"]
    expected = tiny_embedder.embed([{"text": t} for t in texts])
    with server.client() as client:
        as_float = client.post("/v1/embeddings", json={"input": texts})
        as_b64 = client.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
        single = client.post("/v1/embeddings", json={"input": texts[0], "model": server_model(client)})
        objects = client.post("/v1/embeddings", json={"input": sample_inputs[:3]})
    assert as_float.status_code == 200, as_float.text
    body = as_float.json()
    assert body["object"] == "list" and body["model"] == server_model_name(server)
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    np.testing.assert_allclose(
        np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32), expected, atol=ATOL
    )
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in as_b64.json()["data"]]
    )
    np.testing.assert_allclose(decoded, expected, atol=ATOL)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    np.testing.assert_allclose(single.json()["data"][0]["embedding"], expected[0], atol=ATOL)
    np.testing.assert_allclose(
        np.asarray([d["embedding"] for d in objects.json()["data"]]),
        tiny_embedder.embed(sample_inputs[:3]),
        atol=ATOL,
    )
    norms = np.linalg.norm(decoded, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # always normalised


def server_model_name(server) -> str:
    with server.client() as client:
        return client.get("/info").json()["model"]


def server_model(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


def test_openai_model_field(server):
    with server.client() as client:
        models = client.get("/v1/models").json()
        name = models["data"][0]["id"]
        ok = client.post("/v1/embeddings", json={"input": "x", "model": name})
        wrong = client.post("/v1/embeddings", json={"input": "x", "model": "text-embedding-3-small"})
        dims = client.post("/v1/embeddings", json={"input": "x", "dimensions": 3})
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert ok.status_code == 200
    assert wrong.status_code == 404 and wrong.json()["error"]["type"] == "not_found"
    assert dims.status_code == 422


def test_info_reports_model_and_limits(server, tiny_embedder):
    with server.client() as client:
        info = client.get("/info").json()
    assert info["dim"] == tiny_embedder.dim
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    # The server is started with the default --device auto: the probes name what it became.
    assert [(d["device"], d["status"]) for d in info["devices"]] == [("cpu", "ready")]
    assert info["status"] == "ready"
    limits = info["limits"]
    assert limits["max_inputs_per_request"] == 16
    assert limits["max_images_per_input"] == 2
    assert limits["max_image_pixels"] == 10000
    assert limits["max_input_tokens"] == 512
    assert limits["max_body_bytes"] == 300000
    assert info["batching"]["max_batch_size"] == 8


def test_metrics_exposes_the_contract_names(server):
    with server.client() as client:
        client.post("/embed", json={"inputs": [{"text": "metrics"}]})
        text = client.get("/metrics").text
    assert 'llave_requests_total{route="/embed",status="200"}' in text
    for name in ("llave_queue_inputs", "llave_batch_size_bucket", "llave_batch_tokens_bucket"):
        assert any(line.startswith(name) for line in text.splitlines()), name
    for stage in ("preprocess", "queue", "inference"):
        assert any(
            line.startswith("llave_stage_seconds_bucket") and f'stage="{stage}"' in line
            for line in text.splitlines()
        ), stage


def test_docs_and_openapi_have_examples(server):
    with server.client() as client:
        docs = client.get("/docs")
        spec = client.get("/openapi.json").json()
    assert docs.status_code == 200
    for path in ("/embed", "/v1/embeddings"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert content["examples"], path
    for path in ("/health", "/ready", "/info", "/metrics", "/v1/models"):
        assert path in spec["paths"]
