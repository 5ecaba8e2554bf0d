"""Binary indexes (option ``"precision": "binary"``): the sign bits rank, exact scores decide.

FAISS ``IndexBinaryHNSW`` (embedded) and pgvector ``bit`` + Hamming ``<~>`` (PostgreSQL) hold
one bit per dimension, a 32nd of the float32 vectors; the candidates they propose are
rescored against the stored float32 vectors, so every returned score is exact.
"""

from __future__ import annotations

import numpy as np
import psycopg

from tests.service import test_store as contract
from tests.service.test_payload_indexes import bulk_load
from tests.service.test_store import ids_for, unit

backend, data_dir, make_store = contract.backend, contract.data_dir, contract.make_store


def test_binary_candidates_are_rescored_exactly(make_store, backend):
    rng = np.random.default_rng(0)
    n, dim = 1000, 256
    x = unit(rng.standard_normal((n, dim))).astype(np.float32)
    ids = ids_for(n)
    with make_store(background_rebuild=False) as store:
        store.create_collection("bits", dim, "hnsw", {"precision": "binary"}, indexes={"g": "integer"})
        store.upsert("bits", ids, x, [{"g": i % 10} for i in range(n)])
        store.wait_for_maintenance()
        for i in range(0, n, 97):
            q = unit(x[i] + 0.03 * rng.standard_normal(dim)[None])[0]
            hits = store.search("bits", q, 10)
            assert hits[0]["id"] == ids[i]
            exact = x @ q
            for h in hits:  # every score is the float32 cosine, not a Hamming distance
                assert abs(h["score"] - exact[int(h["id"].split("-")[1])]) < 1e-5
            assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
            filtered = store.search("bits", q, 5, {"g": (i + 1) % 10})
            assert len(filtered) == 5 and all(
                int(h["id"].split("-")[1]) % 10 == (i + 1) % 10 for h in filtered
            )
        if backend == "sqlite":
            index = store._collections["bits"].live.index
            assert index.mode == "hnsw" and index.reduced and index._codes().shape == (n, dim // 8)
        else:
            with psycopg.connect(store.url) as conn:
                (indexdef,) = conn.execute(
                    "SELECT indexdef FROM pg_indexes WHERE indexname LIKE '%%_ann'"
                ).fetchone()
            assert f"binary_quantize(embedding))::bit({dim})" in indexdef and "bit_hamming_ops" in indexdef
    with make_store() as store:  # reopened: the same answers (embedded: from the saved snapshot)
        q = unit(x[5] + 0.03 * rng.standard_normal(dim)[None])[0]
        assert store.search("bits", q, 1)[0]["id"] == ids[5]


def test_binary_recall_against_brute_force(make_store, backend):
    """Clustered vectors (where sign bits rank coarsely): recall@10 of the rescored answers
    against exact search, unfiltered and with a filter answered by a scan of its matches
    (1,000 of them: many more than the rescored candidates of an unfiltered search)."""
    rng = np.random.default_rng(3)
    n, dim, nq = 6000, 256, 20
    centres = rng.standard_normal((600, dim))
    x = unit(centres[rng.integers(0, 600, n)] + 0.8 * rng.standard_normal((n, dim))).astype(np.float32)
    qs = unit(centres[rng.integers(0, 600, nq)] + 0.8 * rng.standard_normal((nq, dim))).astype(np.float32)
    group = np.arange(n) % 6
    with make_store() as store:
        options = {"precision": "binary", "ef_construction": 64}  # a quicker build: pgvector's least
        store.create_collection("bits", dim, "hnsw", options, indexes={"g": "integer"})
        bulk_load(store, backend, "bits", x, [{"g": int(g)} for g in group])
        # with 10 x k candidates rescored (no more for a scan): 0.91 unfiltered, and 0.71 from
        # the embedded store's Hamming scan of the 1,000 matches
        for flt, allowed, least in ((None, np.ones(n, bool), 0.94), ({"g": 2}, group == 2, 0.98)):
            found = 0
            for q in qs:
                truth = set(np.argsort(-np.where(allowed, x @ q, -np.inf))[:10])
                found += len(truth & {int(h["id"]) for h in store.search("bits", q, 10, flt)})
            assert found / (10 * nq) >= least, (flt, found / (10 * nq))
