"""Shared fixtures: tiny random checkpoints built offline once per test session."""

from __future__ import annotations

import base64
import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random checkpoint in transformers' LlavaOnevision (HF) layout."""
    from model.tiny import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-hf"), fmt="hf", seed=0, preset="tiny")


@pytest.fixture(scope="session")
def tiny_llava_checkpoint(tmp_path_factory):
    """The same weights as ``tiny_checkpoint`` in the LLaVE authors' layout."""
    from model.tiny import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-llava"), fmt="llava", seed=0, preset="tiny")


@pytest.fixture(scope="session")
def tiny_embedder(tiny_checkpoint):
    from model import load_embedder

    return load_embedder(tiny_checkpoint, device="cpu", dtype="float32")


def make_png(width: int, height: int, color=(200, 30, 30), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """Encode a solid image with a darker square so it is not uniform."""
    img = Image.new(mode, (width, height), color if mode == "RGB" else 128)
    if mode == "RGB" and width > 2 and height > 2:
        img.paste((10, 10, 10), (0, 0, max(1, width // 3), max(1, height // 3)))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def png_b64():
    """Factory: ``png_b64(w, h, color)`` -> base64 PNG text."""
    return lambda w, h, color=(200, 30, 30): b64(make_png(w, h, color))


# --- a real PostgreSQL with pgvector (tests/postgres.py) -------------------------------------------


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """One PostgreSQL 18 + pgvector for the session, started on first use, stopped at the end.

    Never skipped silently: only ``LLAVE_TEST_POSTGRES=0`` turns the PostgreSQL tests off.
    """
    if os.environ.get("LLAVE_TEST_POSTGRES", "1") == "0":
        pytest.skip("PostgreSQL tests disabled by LLAVE_TEST_POSTGRES=0")
    from tests.postgres import PostgresServer

    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


_db_counter = iter(range(10**9))


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's PostgreSQL."""
    return postgres_server.new_database(f"t{next(_db_counter)}")
