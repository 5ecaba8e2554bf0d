"""Server hardening: strict numbers, 405 Allow headers, the served name, settings that conflict
or hurt. In-process app (TestClient) on the tiny checkpoint; no subprocess server."""

from __future__ import annotations

import logging
import os
import time

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.__main__ import load_settings, main
from service.http.app import create_app
from service.inference.hardware import dtype_warning, native_bf16
from service.settings import Settings, default_served_name

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def ready_client(settings: Settings):
    client = TestClient(create_app(settings))
    client.__enter__()
    for _ in range(1200):
        if client.get("/ready").status_code == 200:
            return client
        time.sleep(0.05)
    raise AssertionError(client.get("/ready").text)


@pytest.fixture(scope="module")
def client(tiny_checkpoint, tmp_path_factory):
    settings = Settings(model=str(tiny_checkpoint), data_dir=tmp_path_factory.mktemp("hardening"))
    client = ready_client(settings)
    yield client
    client.__exit__(None, None, None)


# --- strict numbers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def collection(client):
    assert client.put("/collections/strict", json={"dim": 2}).status_code == 200
    docs = {"documents": [{"id": "a", "vector": [1, 0]}, {"id": "b", "vector": [0.0, 1.0]}]}
    assert client.post("/collections/strict/documents", json=docs).status_code == 200
    return "strict"


@pytest.mark.parametrize("bad", ["1", True, "true", None])
def test_a_vector_component_must_be_a_number(client, collection, bad):
    good = client.post("/search", json={"collection": collection, "query": {"vector": [1, 0]}, "k": 1})
    assert good.status_code == 200 and good.json()["hits"][0]["id"] == "a"  # ints are numbers
    search = {"collection": collection, "query": {"vector": [bad, 0]}, "k": 1}
    assert client.post("/search", json=search).status_code == 422
    upsert = {"documents": [{"id": "c", "vector": [bad, 0]}]}
    response = client.post(f"/collections/{collection}/documents", json=upsert)
    assert response.status_code == 422 and response.json()["error"]["type"] == "invalid_request"


@pytest.mark.parametrize("bad", ["1", True, 1.0, "1.5"])
def test_k_and_dim_must_be_integers(client, collection, bad):
    search = {"collection": collection, "query": {"vector": [1, 0]}, "k": bad}
    response = client.post("/search", json=search)
    assert response.status_code == 422 and "k" in response.json()["error"]["message"]
    assert client.put("/collections/other", json={"dim": bad}).status_code == 422


def test_booleans_are_not_read_from_strings(client, collection):
    search = {"collection": collection, "query": {"vector": [1, 0]}, "truncate": "false"}
    assert client.post("/search", json=search).status_code == 422
    upsert = {"documents": [{"id": "c", "vector": [1, 1]}], "truncate": 0}
    assert client.post(f"/collections/{collection}/documents", json=upsert).status_code == 422


# --- 405 and Allow ---------------------------------------------------------------------


def concrete(template: str) -> str:
    return template.replace("{name}", "c").replace("{doc_id}", "d").replace("{doc_id:path}", "d")


def test_every_405_lists_every_method_of_its_path(client):
    paths = client.app.openapi()["paths"]
    multi = {template for template, ops in paths.items() if len(ops) > 1}
    assert "/collections/{name}" in multi  # GET, PUT and DELETE: Starlette alone names one
    for template, operations in paths.items():
        response = client.request("PATCH", concrete(template))  # no route takes PATCH
        assert response.status_code == 405, template
        assert response.json()["error"]["type"] == "method_not_allowed"
        allowed = response.headers["allow"].split(", ")
        assert allowed == sorted(m.upper() for m in operations), (template, allowed)
        for method in allowed:  # and each of them is really served there (not 405)
            if method in ("GET", "DELETE"):
                assert client.request(method, concrete(template)).status_code != 405, (method, template)


# --- the served name -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("/srv/models/llave-0.5b", "llave-0.5b"),
        ("/srv/models/llave-0.5b/", "llave-0.5b"),
        ("./checkpoints/run-7/final", "final"),
        ("zhibinlan/LLaVE-0.5B", "LLaVE-0.5B"),
        ("LLaVE-2B", "LLaVE-2B"),
        ("C:\\models\\llave", "llave"),
    ],
)
def test_the_default_served_name_is_the_last_component(model, name):
    assert default_served_name(model) == name
    assert Settings(model=model).model_name == name
    assert Settings(model=model, served_model_name="prod-embedder").model_name == "prod-embedder"


def test_the_current_folder_is_named_not_dotted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_served_name(".") == default_served_name("./") == tmp_path.name


def test_no_answer_shows_the_checkpoint_path(client, tiny_checkpoint):
    path, name = str(tiny_checkpoint), tiny_checkpoint.name
    assert "/" in path and name and name != path
    info = client.get("/info")
    models = client.get("/v1/models")
    embed = client.post("/embed", json={"inputs": [{"text": "a"}]})
    openai = client.post("/v1/embeddings", json={"input": "a", "model": name})
    for response in (info, models, embed, openai):
        assert response.status_code == 200, response.text
        assert path not in response.text and str(tiny_checkpoint.parent) not in response.text
    assert info.json()["model"] == models.json()["data"][0]["id"] == embed.json()["model"] == name
    assert openai.json()["model"] == name


# --- settings that conflict ------------------------------------------------------------


def test_a_small_queue_lowers_the_default_request_limit_with_a_warning(monkeypatch):
    s = load_settings(["--model", "m", "--max-queue", "8", "--api-workers", "1"])  # one share: one warning
    assert (s.max_queue, s.max_inputs_per_request) == (8, 8)
    assert len(s.adjustments) == 1 and "max_inputs_per_request" in s.adjustments[0]
    assert Settings(model="m").adjustments == []  # nothing to adjust by default
    monkeypatch.setenv("LLAVE_MAX_QUEUE", "4")  # an env var counts the same as a flag
    assert load_settings(["--model", "m"]).max_inputs_per_request == 4


def test_two_explicit_values_that_contradict_are_refused(monkeypatch):
    with pytest.raises(ValidationError, match="max_inputs_per_request"):
        Settings(model="m", max_queue=8, max_inputs_per_request=16)
    monkeypatch.setenv("LLAVE_MAX_INPUTS_PER_REQUEST", "16")
    with pytest.raises(SystemExit):
        load_settings(["--model", "m", "--max-queue", "8"])


def test_the_cli_logs_the_adjustment_and_hands_uvicorn_the_limits(monkeypatch, caplog):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.update(config=self.config))
    with caplog.at_level(logging.WARNING, logger="llave.main"), pytest.raises(SystemExit) as exited:
        main(["--model", "m", "--max-queue", "8", "--max-connections", "7", "--header-timeout-s", "2",
              "--api-workers", "1"])  # fmt: skip
    assert exited.value.code == 0
    assert any("lowered from its default 128 to max_queue (8)" in r.getMessage() for r in caplog.records)
    limits = seen["config"].http.limits
    assert (limits.max_connections, limits.header_timeout_s, limits.body_timeout_s) == (7, 2.0, 60.0)
    assert seen["config"].timeout_keep_alive == 75
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # main() leaves the process as it found it


# --- settings that hurt ----------------------------------------------------------------


def test_bf16_support_is_read_from_the_cpu_flags():
    assert native_bf16(AVX2_ONLY)[0] is False
    assert native_bf16(AVX512_BF16) == (True, "/proc/cpuinfo lists avx512_bf16")
    assert native_bf16(ARM_BF16)[0] is True


def test_bf16_on_a_cpu_without_it_warns_and_nothing_else_does():
    warning = dtype_warning("cpu", "bfloat16", AVX2_ONLY)
    assert warning is not None and "6x slower" in warning and "--dtype float32" in warning
    assert dtype_warning("cpu", "torch.bfloat16", AVX2_ONLY) == warning
    assert dtype_warning("cpu", "bfloat16", AVX512_BF16) is None
    assert dtype_warning("cpu", "float32", AVX2_ONLY) is None
    assert dtype_warning("cuda:0", "bfloat16", AVX2_ONLY) is None


def test_the_engine_warns_before_its_warm_up(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    # The engine's own loading sequence, run in this process (as the engine process runs it).
    import asyncio

    from service.inference.engine import EngineCore

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(AVX2_ONLY)
    monkeypatch.setattr("service.inference.hardware.CPUINFO", cpuinfo)
    settings = Settings(
        model=str(tiny_checkpoint), data_dir=tmp_path / "data", device="cpu", dtype="bfloat16"
    )
    core = EngineCore(settings.engine_config())

    async def load() -> None:
        await core.start()
        await core.stop()

    with caplog.at_level(logging.INFO, logger="llave.engine"):
        asyncio.run(load())
    messages = [r.getMessage() for r in caplog.records if r.name == "llave.engine"]
    warned = next(i for i, m in enumerate(messages) if "without native bf16" in m)
    ready = next(i for i, m in enumerate(messages) if m.startswith("model ready"))
    assert warned < ready


def test_auto_keeps_float32_on_cpu(client):
    assert client.get("/info").json()["dtype"] == "float32"
