"""Servers for the reliability tests: real ``python -m service`` processes on the tiny checkpoint."""

from __future__ import annotations

import pytest

# The shared check modules use plain asserts: let pytest explain them when they fail.
CHECK_MODULES = (
    "attacks",
    "crash",
    "faults",
    "helpers",
    "hostile",
    "load",
    "runner",
    "servers",
    "slow_clients",
)
pytest.register_assert_rewrite(*(f"tests.reliability.{name}" for name in CHECK_MODULES))

from tests.reliability.servers import start_keyed_server, start_main_server  # noqa: E402


@pytest.fixture(scope="session")
def rel_server(tiny_checkpoint, tmp_path_factory):
    server = start_main_server(tiny_checkpoint, tmp_path_factory.mktemp("reliability-main"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def keyed_server(tiny_checkpoint, tmp_path_factory):
    server = start_keyed_server(tiny_checkpoint, tmp_path_factory.mktemp("reliability-keyed"))
    yield server
    server.stop()
