"""Far past capacity for a bounded time: only 200/429 (503 only for a timeout), nothing lost,
memory bounded, and the server healthy and quick again afterwards (``load.check_overload``).

``RELIABILITY_LOAD_CLIENTS`` / ``RELIABILITY_LOAD_SECONDS`` change the size of the run.
"""

from __future__ import annotations

import os

from tests.reliability.load import check_overload

CLIENTS = int(os.environ.get("RELIABILITY_LOAD_CLIENTS", "200"))
SECONDS = float(os.environ.get("RELIABILITY_LOAD_SECONDS", "12"))


def test_overload_is_refused_cleanly_and_loses_nothing(keyed_server):
    print("load:", check_overload(keyed_server, clients=CLIENTS, seconds=SECONDS))
