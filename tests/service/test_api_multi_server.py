"""Several servers, one store: two ``python -m service`` processes on one PostgreSQL."""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest

from tests.service.conftest import start_server


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tmp_path_factory, postgres_server):
    url = postgres_server.new_database("multi_server")
    servers = []
    try:
        for i in range(2):
            servers.append(
                start_server(
                    tiny_checkpoint, tmp_path_factory.mktemp(f"multi-{i}"), env={"LLAVE_STORE_URL": url}
                )
            )
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_a_write_acknowledged_by_one_is_searchable_from_the_other_at_once(pair):
    a, b = pair
    rng = np.random.default_rng(0)
    with a.client() as ca, b.client() as cb:
        for i in range(20):
            v = rng.standard_normal(8).tolist()
            r = ca.post("/collections/shared/documents", json={"documents": [{"id": f"d{i}", "vector": v}]})
            assert r.status_code == 200, r.text
            hits = cb.post("/search", json={"collection": "shared", "query": {"vector": v}, "k": 1}).json()
            assert hits["hits"][0]["id"] == f"d{i}"
            assert cb.get(f"/collections/shared/documents/d{i}").status_code == 200
        assert cb.get("/collections/shared").json()["count"] == 20
        assert cb.delete("/collections/shared/documents/d3").status_code in (200, 204)
        assert ca.get("/collections/shared/documents/d3").status_code == 404
        assert ca.delete("/collections/shared").status_code in (200, 204)
        assert cb.get("/collections/shared").status_code == 404


def test_concurrent_upserts_of_the_same_ids_end_consistent(pair):
    ids = [f"same-{i}" for i in range(40)]

    def write(server, who: int, round_: int) -> int:
        rng = np.random.default_rng(who * 1000 + round_)
        docs = [
            {
                "id": doc_id,
                "vector": rng.standard_normal(8).tolist(),
                "metadata": {"who": who, "round": round_},
            }
            for doc_id in (ids if round_ % 2 else ids[::-1])
        ]
        with server.client() as c:
            return c.post("/collections/race/documents", json={"documents": docs}).status_code

    with cf.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda t: write(pair[t % 2], t % 2, t), range(24)))
    assert statuses == [200] * 24
    states = []
    for server in pair:
        with server.client() as c:
            assert c.get("/collections/race").json()["count"] == 40
            states.append(
                {(c.get(f"/collections/race/documents/{d}").json()["metadata"]["round"]) for d in ids}
            )
    assert states[0] == states[1] and len(states[0]) == 1  # one batch won, whole, seen alike by both
