"""Payload indexes and the filtered-search planner, on both backends.

A filter on an indexed key must select exactly what the scan selects (checked against
Python's reading of the filter, written here independently of the SQL), read only the
matching rows (SQLite's EXPLAIN QUERY PLAN, PostgreSQL's EXPLAIN), and the planner must keep
recall@10 >= 0.98 against brute force at every selectivity.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import psycopg
import pytest

from service.storage import planner, sqlite_payload
from service.storage.errors import InvalidFilterError, InvalidParameterError
from tests.service import test_store as contract
from tests.service.test_store import assert_exact, ids_for, matches_filter, random_data, unit

# the contract suite's fixtures: each test runs on both backends
backend, data_dir, make_store, store = (
    contract.backend,
    contract.data_dir,
    contract.make_store,
    contract.store,
)

INDEXES = {"kind": "keyword", "price": "float", "n": "integer", "date": "datetime"}
KINDS = ["bolt", "nut", "gear", 'O\'Brien "x"', "é"]
DATES = ["2026-01-05", "2026-01-05T12:00:00Z", "2026-01-05T13:00:00+02:00", "2025-12-31T23:59:59.5",
         "2026-02-30", "yesterday", "2026-03-01 08:00"]  # fmt: skip


def _metadata(i: int) -> dict | None:
    if i % 29 == 0:
        return None
    if i % 31 == 0:
        return {}
    pool = [1, 2.5, 10, 10.0, 15, 19.99, 20, "15", True, None, -3, [10]]
    return {
        "kind": [*KINDS, 7, ["bolt"]][i % 7],
        "price": pool[i % len(pool)],
        "n": i % 10,
        "date": DATES[i % len(DATES)],
        "other": i % 3,
    }


def _epoch(text) -> float | None:
    """The datetime reading of the filter language, written here with Python's own parser."""
    if not isinstance(text, str) or text in ("yesterday",) or len(text) < 10:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def allowed_by(f: dict, meta: list) -> np.ndarray:
    def ok(m, key, value):
        if isinstance(value, dict) and any(isinstance(v, str) for v in value.values()):
            actual = _epoch(None if m is None else m.get(key))
            if actual is None:
                return False
            bounds = {op: _epoch(v) for op, v in value.items()}
            return all({"gt": actual > b, "gte": actual >= b, "lt": actual < b, "lte": actual <= b}[op]
                       for op, b in bounds.items())  # fmt: skip
        return matches_filter(m, key, value)

    return np.array([all(ok(m, key, v) for key, v in f.items()) for m in meta])


FILTERS = [
    {"kind": "bolt"},
    {"kind": ["nut", 'O\'Brien "x"', "é"]},
    {"kind": {"not": ["bolt", "gear"]}},
    {"kind": 7},  # a number on a keyword index: scanned, same answer
    {"price": 10},
    {"price": {"gte": 10, "lt": 20}},
    {"price": {"gt": 2.5, "not": 15}},
    {"n": {"lte": 3}, "kind": "gear"},
    {"date": {"gte": "2026-01-05T11:00:00Z"}},
    {"date": {"gt": "2026-01-01", "lte": "2026-01-05T11:00:00+00:00"}},
    {"date": {"lt": "2026-01-01T00:00:00"}},
    {"other": 1, "n": [1, 2, 3]},  # "other" is not indexed
]


def test_indexed_filters_select_what_the_scan_selects(store, backend):
    x = random_data(600, 8, 3)
    ids = ids_for(len(x))
    meta = [_metadata(i) for i in range(len(x))]
    info = store.create_collection("c", 8, indexes=INDEXES)
    assert info["indexes"] == INDEXES and info["indexing"] == []
    store.upsert("c", ids, x, meta)
    store.create_collection("plain", 8)
    store.upsert("plain", ids, x, meta)
    assert store.search_plan("c", {"kind": "bolt", "other": 1})["scanned"] == ["other"]
    assert store.search_plan("plain", {"kind": "bolt"})["scanned"] == ["kind"]
    assert store.search_plan("c", {"kind": 7})["scanned"] == ["kind"]  # not a keyword value
    q = random_data(1, 8, 4)[0]
    for f in FILTERS:
        allowed = allowed_by(f, meta)
        assert allowed.any(), f
        for name in ("c", "plain"):
            assert_exact(store.search(name, q, 600, f), ids, x, q, 600, allowed)
    # documents replaced and deleted leave the index with them
    store.upsert("c", ["doc-1", "doc-2"], x[:2], [{"kind": "gear"}, None])
    store.delete("c", "doc-5")
    meta[1], meta[2], meta[5] = {"kind": "gear"}, None, {"deleted": True}
    for f in FILTERS[:3]:
        found = {h["id"] for h in store.search("c", q, 600, f)}
        assert found == {ids[i] for i in np.flatnonzero(allowed_by(f, meta)) if i != 5}
    with pytest.raises(InvalidFilterError):
        store.search("c", q, 5, {"date": {"gte": "2026-01-01", "lt": 5}})
    with pytest.raises(InvalidFilterError):
        store.search("c", q, 5, {"date": {"gte": "next tuesday"}})
    for bad in ({"k": "vector"}, {"": "keyword"}, [("k", "keyword")], {f"k{i}": "float" for i in range(33)}):
        with pytest.raises(InvalidParameterError):
            store.create_collection("c", 8, indexes=bad)


def test_declaration_changes_build_in_the_background(make_store, backend):
    x = random_data(3000, 8, 5)
    ids = ids_for(len(x))
    meta = [{"g": i % 100, "h": f"v{i % 7}"} for i in range(len(x))]
    with make_store() as store:
        store.create_collection("c", 8)
        store.upsert("c", ids, x, meta)
        info = store.create_collection("c", 8, indexes={"g": "integer"})
        assert info["indexes"] == {"g": "integer"}
        store.wait_for_maintenance()
        assert store.describe("c")["indexing"] == []
        assert store.search_plan("c", {"g": 7, "h": "v1"})["scanned"] == ["h"]
        store.upsert("c", ["new"], x[:1], [{"g": 7}])  # a write after the build is indexed too
        assert "new" in {h["id"] for h in store.search("c", x[0], 100, {"g": 7})}
        store.create_collection("c", 8, indexes={"h": "keyword"})  # g dropped, h added
        store.wait_for_maintenance()
        assert store.describe("c")["indexes"] == {"h": "keyword"}
        assert store.search_plan("c", {"g": 7, "h": "v1"})["scanned"] == ["g"]
        found = {h["id"] for h in store.search("c", x[3], 1000, {"g": 7, "h": "v1"})}
        assert found == {ids[i] for i in range(len(x)) if i % 100 == 7 and i % 7 == 1}
    with make_store() as store:  # the declaration is kept
        assert store.describe("c")["indexes"] == {"h": "keyword"}
        assert [c["indexes"] for c in store.list_collections()] == [{"h": "keyword"}]


def test_sqlite_indexed_filter_reads_only_matching_rows(data_dir):
    from service.storage.store import CollectionStore

    with CollectionStore(data_dir) as store:
        store.create_collection("c", 4, indexes={"kind": "keyword", "price": "float", "date": "datetime"})
        store.upsert("c", ids_for(50), random_data(50, 4, 0), [{"kind": "a", "price": i} for i in range(50)])
        f = {"kind": "a", "price": {"gte": 3, "lt": 9}, "date": {"gte": "2026-01-01"}}
        where, params, scanned = store._compile_filter("c", f)
        assert scanned == []
        plan = [
            row[3]
            for row in store._read(
                f"EXPLAIN QUERY PLAN SELECT d.row_id FROM documents AS d WHERE {where}", params
            )
        ]
        assert plan[0] == "SEARCH d USING INTEGER PRIMARY KEY (rowid=?)", plan
        lookups = [p for p in plan if p.startswith("SEARCH payload_values")]
        assert len(lookups) == 3 and all("COVERING INDEX payload_values_lookup" in p for p in lookups)
        assert not any(p.startswith("SCAN") for p in plan), plan
        # the planner's count: each clause's entries, from the covering index alone
        counts = sqlite_payload.count_queries("c", f, store.describe("c")["indexes"])
        assert [store._read(sql, args)[0][0] for sql, args in counts] == [50, 6, 0]
        for sql, args in counts:
            (step,) = [r[3] for r in store._read("EXPLAIN QUERY PLAN " + sql, args)]
            assert step.startswith("SEARCH payload_values USING COVERING INDEX payload_values_lookup"), step
        # the form that checks a few candidates reads only their own entries, and agrees: rows
        # 1, 3, ..., 39 hold prices 0, 2, ..., 38
        candidates = list(range(1, 40, 2))
        checks = (
            ({"kind": "a", "price": {"gte": 3, "lt": 9}}, 3),
            ({"price": {"not": [4, 5]}}, 19),
            ({"kind": ["b"]}, 0),
        )
        for f, expected in checks:
            rows = []
            for per_row in (False, True):
                where, params, _ = store._compile_filter("c", f, per_row=per_row)
                sql = f"SELECT d.row_id FROM documents AS d WHERE d.row_id IN ({', '.join('?' * 20)}) AND {where}"
                rows.append([r[0] for r in store._read(sql, [*candidates, *params])])
            assert rows[0] == rows[1] and len(rows[1]) == expected, (f, rows)
            plan = [r[3] for r in store._read("EXPLAIN QUERY PLAN " + sql, [*candidates, *params])]
            assert not any("payload_values_lookup" in p or p.startswith("SCAN") for p in plan), plan
        where, params, scanned = store._compile_filter("c", {"other": 1})
        assert scanned == ["other"]
        plan = [
            row[3]
            for row in store._read(
                f"EXPLAIN QUERY PLAN SELECT d.row_id FROM documents AS d WHERE {where}", params
            )
        ]
        assert any("json_each" in p or p.startswith("SCAN") for p in plan), plan


def test_postgres_indexed_filter_uses_the_expression_index(postgres_url):
    from service.storage.postgres import PostgresCollectionStore
    from service.storage.postgres_filters import compile_filter

    with PostgresCollectionStore(postgres_url) as store:
        store.create_collection("c", 4, indexes={"kind": "keyword", "price": "float", "date": "datetime"})
        n = 5000
        store.upsert("c", ids_for(n), random_data(n, 4, 0),
                     [{"kind": f"k{i % 500}", "price": i, "date": f"2026-01-{1 + i % 28:02d}"} for i in range(n)])  # fmt: skip
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("ANALYZE llave_docs_1")
            for f, index_word in (
                ({"kind": "k7"}, "Index"),
                ({"price": {"gte": 100, "lt": 110}}, "Index"),
                ({"date": {"gte": "2026-01-28T00:00:00Z"}}, "Index"),
            ):
                where, params, scanned = compile_filter(f, store.describe("c")["indexes"])
                assert scanned == []
                plan = "\n".join(
                    r[0] for r in conn.execute(f"EXPLAIN SELECT id FROM llave_docs_1 WHERE {where}", params)
                )
                assert "llave_docs_1_p_" in plan and index_word in plan and "Seq Scan" not in plan, plan
                assert (
                    len(store.search("c", np.ones(4), 1000, f))
                    == {"kind": 10, "price": 10, "date": 178}[next(iter(f))]
                )


def bulk_load(store, backend: str, name: str, x: np.ndarray, metadata: list[dict]) -> None:
    """Upsert ids "0".."n-1"; on PostgreSQL as pgvector advises: its vector index dropped
    first and built once at the end (inserting into the graph row by row is slow)."""
    indexdef = None
    if backend == "postgres":
        with psycopg.connect(store.url, autocommit=True) as conn:
            (indexdef,) = conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE indexname LIKE '%%_ann'"
            ).fetchone()
            conn.execute(f"DROP INDEX {indexdef.split()[2]}")
    store.upsert(name, [str(i) for i in range(len(x))], x, metadata)
    store.wait_for_maintenance()
    if indexdef is not None:
        with psycopg.connect(store.url, autocommit=True) as conn:
            conn.execute(indexdef)
            conn.execute(f"ANALYZE {indexdef.split()[4]}")


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim))
    x = centres[rng.integers(0, 50, n)] + rng.standard_normal((n, dim)) * 0.6
    return unit(x).astype(np.float32)


SELECTIVITY = {"0.1%": [0], "1%": list(range(10)), "10%": list(range(100)), "50%": list(range(500))}


def _recall(store, x, groups, queries, k=10) -> dict[str, float]:
    out = {}
    for sel, values in SELECTIVITY.items():
        allowed = np.isin(groups, values)
        hits_total, wanted = 0, min(k, int(allowed.sum()))
        for q in queries:
            true = np.where(allowed, x @ q, -np.inf)
            truth = set(np.argsort(-true, kind="stable")[:wanted])
            found = {int(h["id"]) for h in store.search("c", q, k, {"g": values})}
            hits_total += len(truth & found)
        out[sel] = hits_total / (wanted * len(queries))
    return out


@pytest.mark.slow
def test_planner_keeps_recall_at_every_selectivity(make_store, backend, monkeypatch):
    """Recall@10 >= 0.98 against brute force at 0.1/1/10/50% with every plan the planner has.
    The scan budget is lowered so that a small collection takes the approximate plans."""
    n, dim = 5000, 32
    x = _clustered(n, dim, 0)
    groups = np.random.default_rng(1).permutation(n) % 1000
    queries = _clustered(40, dim, 2)
    module = planner if backend == "sqlite" else __import__("service.storage.postgres", fromlist=["x"])
    with make_store() as store:
        store.create_collection("c", dim, "hnsw", indexes={"g": "integer"})  # default m, ef
        bulk_load(store, backend, "c", x, [{"g": int(g)} for g in groups])
        plans: list[str] = []
        if backend == "sqlite":
            real = planner.search_filtered

            def recording(*args, **kwargs):
                result, plan = real(*args, **kwargs)
                plans.append(plan)
                return result, plan

            monkeypatch.setattr("service.storage.store.search_filtered", recording)
        monkeypatch.setattr(module, "EXACT_SCAN_BUDGET", 60 * dim)  # over 60 matches: approximate
        recall = _recall(store, x, groups, queries)
        assert min(recall.values()) >= 0.98, recall
        if backend == "sqlite":
            assert {"exact", "postfilter"} <= set(plans), plans
            monkeypatch.setattr(planner, "POSTFILTER_MAX_CANDIDATES", 0)  # the filtered graph walk
            plans.clear()
            recall = _recall(store, x, groups, queries)
            assert min(recall.values()) >= 0.98, recall
            assert "graph" in plans
