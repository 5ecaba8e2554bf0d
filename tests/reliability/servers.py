"""The two servers the reliability checks run against (fixtures in conftest, and the soak runner)."""

from __future__ import annotations

from pathlib import Path

from tests.service.conftest import API_KEY, FAIL_BATCH, MAIN_ARGS, Server, start_server

# Small limits so that "at the limit" and "over the limit" are cheap to send: the same
# limits as the main API-test server.
LIMIT_ARGS = MAIN_ARGS
CORS_ORIGIN = "https://app.example"


def start_main_server(checkpoint: Path, workdir: Path) -> Server:
    """No API key; image URLs allowed from ``localhost`` (public addresses only); the fail-batch hook."""
    server = start_server(
        checkpoint,
        workdir,
        *LIMIT_ARGS,
        "--image-url-allow-hosts", "localhost,*.localhost",
        env={"TEST_LLAVE_FAULTS": f"fail-batch:{FAIL_BATCH}"},
    )  # fmt: skip
    server.model_name = checkpoint.name  # the default served name: published by /info and /v1/models
    return server


def start_keyed_server(checkpoint: Path, workdir: Path) -> Server:
    """API key and CORS on, image URLs off (the default), a small queue (32 inputs) to overload."""
    server = start_server(
        checkpoint,
        workdir,
        "--max-queue", "32",
        "--max-batch-size", "8",
        "--max-inputs-per-request", "16",
        "--request-timeout-s", "30",
        "--preprocess-workers", "2",
        "--cors-origins", CORS_ORIGIN,
        env={"LLAVE_API_KEY": API_KEY},
    )  # fmt: skip
    server.model_name = checkpoint.name
    server.auth = {"Authorization": f"Bearer {API_KEY}"}
    return server
