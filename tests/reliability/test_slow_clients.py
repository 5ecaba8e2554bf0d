"""Slow clients against a real ``python -m service``: 200 slowloris / slow-POST connections
trickle while normal clients are served; all of them are answered 408 at their deadline.

The deadlines are shortened (8 s) to keep the test short; the connection cap is the default.
See ``tests/reliability/slow_clients.py`` for what is held and why it can fail.
"""

from __future__ import annotations

import json

import pytest

from tests.reliability.slow_clients import check_slow_clients
from tests.service.conftest import start_server

DEADLINE_S = 8.0


@pytest.fixture(scope="module")
def slow_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("slow-clients"),
        "--header-timeout-s", str(DEADLINE_S),
        "--body-timeout-s", str(DEADLINE_S),
        "--preprocess-workers", "2",
    )  # fmt: skip
    yield server
    server.stop()


def test_slow_clients_do_not_starve_normal_ones_and_are_dropped_at_their_deadline(slow_server):
    summary = check_slow_clients(
        slow_server, slow=200, normal=20, header_timeout_s=DEADLINE_S, body_timeout_s=DEADLINE_S
    )
    print("slow clients:", json.dumps(summary))
