"""A model that produces NaN: requests fail with a clear 500 and nothing reaches the store."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.service.conftest import start_server


@pytest.fixture(scope="module")
def nan_server(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with the language model's final norm set to NaN."""
    ckpt = tmp_path_factory.mktemp("nan-ckpt")
    shutil.copytree(tiny_checkpoint, ckpt, dirs_exist_ok=True)
    weights = load_file(ckpt / "model.safetensors")
    norms = [
        k
        for k in weights
        if k.endswith("language_model.model.norm.weight") or k.endswith("language_model.norm.weight")
    ]
    assert len(norms) == 1, sorted(weights)[:20]
    weights[norms[0]] = torch.full_like(weights[norms[0]], float("nan"))
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    srv = start_server(ckpt, tmp_path_factory.mktemp("nan-server"), "--preprocess-workers", "1")
    yield srv
    srv.stop()


def test_non_finite_embeddings_are_a_500_on_every_embedding_route(nan_server):
    with nan_server.client() as c:
        for path, body in (
            ("/embed", {"inputs": [{"text": "a red circle"}]}),
            ("/v1/embeddings", {"input": "a red circle"}),
        ):
            r = c.post(path, json=body)
            assert r.status_code == 500, r.text
            error = r.json()["error"]
            assert error["type"] == "inference_error"
            assert "non-finite" in error["message"]


def test_non_finite_embeddings_never_reach_a_collection(nan_server):
    with nan_server.client() as c:
        docs = [{"id": "v", "vector": [1.0] + [0.0] * 15}]
        assert c.post("/collections/c/documents", json={"documents": docs}).status_code == 200
        r = c.post("/collections/c/documents", json={"documents": [{"id": "t", "text": "a red circle"}]})
        assert r.status_code == 500, r.text
        assert c.get("/collections/c").json()["count"] == 1
        assert c.get("/collections/c/documents/t").status_code == 404
