"""Servers for the reliability tests: real ``python -m service`` processes on the tiny checkpoint."""

from __future__ import annotations

import pytest

# The shared check modules use plain asserts: let pytest explain them when they fail.
pytest.register_assert_rewrite(
    *(f"tests.reliability.{name}" for name in ("attacks", "crash", "faults", "helpers", "hostile", "load"))
)

from tests.service.conftest import API_KEY, FAIL_BATCH, start_server  # noqa: E402

# Small limits so that "at the limit" and "over the limit" are cheap to send.
LIMIT_ARGS = (
    "--max-batch-size", "8",
    "--max-queue", "256",
    "--max-inputs-per-request", "16",
    "--max-images-per-input", "2",
    "--max-image-pixels", "10000",
    "--max-input-tokens", "512",
    "--max-body-bytes", "300000",
    "--preprocess-workers", "2",
)  # fmt: skip


@pytest.fixture(scope="session")
def rel_server(tiny_checkpoint, tmp_path_factory):
    """No API key; image URLs allowed from ``localhost`` (public addresses only); fail-batch hook."""
    srv = start_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("reliability-main"),
        *LIMIT_ARGS,
        "--image-url-allow-hosts", "localhost,*.localhost",
        env={"LLAVE_FAULT_INJECTION": f"fail-batch:{FAIL_BATCH}"},
    )  # fmt: skip
    srv.model_name = str(tiny_checkpoint)  # the default served name: published by /info and /v1/models
    yield srv
    srv.stop()


CORS_ORIGIN = "https://app.example"


@pytest.fixture(scope="session")
def keyed_server(tiny_checkpoint, tmp_path_factory):
    """API key and CORS on, image URLs off (the default), a small queue (32 inputs) to overload."""
    srv = start_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("reliability-keyed"),
        "--max-queue", "32",
        "--max-batch-size", "8",
        "--max-inputs-per-request", "16",
        "--request-timeout-s", "30",
        "--preprocess-workers", "2",
        "--cors-origins", CORS_ORIGIN,
        env={"LLAVE_API_KEY": API_KEY},
    )  # fmt: skip
    srv.model_name = str(tiny_checkpoint)
    srv.auth = {"Authorization": f"Bearer {API_KEY}"}
    yield srv
    srv.stop()
