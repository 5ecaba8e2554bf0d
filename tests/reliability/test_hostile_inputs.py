"""Hand-written hostile requests against a live server: only the expected 2xx/4xx, never a 5xx,
error bodies in the documented shape without traces or paths, and the server healthy after each.
The cases are listed in ``tests/reliability/hostile.py``."""

from __future__ import annotations

import urllib.parse

import httpx
import pytest

from tests.reliability.helpers import assert_healthy
from tests.reliability.hostile import JSON, check_case, hostile_cases

COLLECTION = "hostile"
CASES = hostile_cases(COLLECTION)


@pytest.fixture(scope="module")
def client(rel_server):
    with rel_server.client() as c:
        response = c.post(
            f"/collections/{COLLECTION}/documents", json={"documents": [{"id": "a", "vector": [1.0, 0.0]}]}
        )
        assert response.status_code == 200, response.text
        yield c
    assert_healthy(rel_server.url)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request(rel_server, client, case):
    check_case(client, case, public=(rel_server.model_name,))


def test_ids_at_the_limits_round_trip(client):
    """Ids that were accepted can be read back through the URL, however odd."""
    for doc_id in ("i" * 512, "🙂" * 512, "a/../../b", "..", "%2e%2e", "spaces and ? # &"):
        upsert = client.post(
            f"/collections/{COLLECTION}-ids/documents",
            json={"documents": [{"id": doc_id, "vector": [0.6, 0.8]}]},
        )
        assert upsert.status_code == 200, (doc_id, upsert.text)
        # dots escaped too: clients drop a literal ".." path segment (RFC 3986 dot-segment removal)
        quoted = urllib.parse.quote(doc_id, safe="").replace(".", "%2E")
        got = client.get(f"/collections/{COLLECTION}-ids/documents/{quoted}")
        assert got.status_code == 200, (doc_id, got.text)
        assert got.json()["id"] == doc_id


def test_a_stalled_body_does_not_block_anyone(rel_server):
    """Clients that send headers and then stall hold a connection each, and nothing else."""
    import socket

    stalled = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", rel_server.port), timeout=10)
            sock.sendall(
                b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: "
                + JSON.encode()
                + b'\r\nContent-Length: 100000\r\n\r\n{"inputs": ['
            )
            stalled.append(sock)
        assert_healthy(rel_server.url)
        with httpx.Client(base_url=rel_server.url, timeout=30) as c:
            assert c.post("/embed", json={"inputs": [{"text": "x"}] * 8}).status_code == 200
    finally:
        for sock in stalled:
            sock.close()
