"""The collection store against real SQLite and real FAISS; results checked by brute force."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading

import numpy as np
import pytest

from service.storage import vector_index
from service.storage.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    DimensionMismatchError,
    DocumentNotFoundError,
    DuplicateIdError,
    InvalidFilterError,
    InvalidMetadataError,
    InvalidNameError,
    InvalidParameterError,
    InvalidVectorError,
    StoreUnavailableError,
)
from service.storage.store import CollectionStore
from service.storage.vector_index import ApproximateIndex, LiveIndex

TOL = 1e-5
REDUCED_PRECISION = {"sqlite": "sq8", "postgres": "halfvec"}  # option "precision" of hnsw/ivf


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request):
    """The contract tests run against both backends: SQLite + FAISS and PostgreSQL + pgvector."""
    return request.param


@pytest.fixture
def make_store(backend, data_dir, request):
    """``make_store(**options)``: an unopened store of this test's backend; the same place each call."""
    if backend == "sqlite":
        return lambda **kw: CollectionStore(data_dir, **kw)
    from service.storage.postgres import PostgresCollectionStore

    url = request.getfixturevalue("postgres_url")
    return lambda **kw: PostgresCollectionStore(url, **kw)


@pytest.fixture
def store(make_store):
    with make_store(background_rebuild=False) as s:
        yield s


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_data(n: int, dim: int, seed: int, *, clustered: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if not clustered:
        return rng.standard_normal((n, dim)).astype(np.float32)
    centers = rng.standard_normal((8, dim)) * 4
    x = centers[rng.integers(0, 8, n)] + rng.standard_normal((n, dim)) * 0.3
    x[n // 2 : n // 2 + 10] = x[0]  # exact duplicates: tied scores
    return x.astype(np.float32)


def ids_for(n: int, prefix: str = "doc") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def assert_exact(
    hits: list[dict],
    ids: list[str],
    vectors: np.ndarray,
    query: np.ndarray,
    k: int,
    allowed: np.ndarray | None = None,
) -> None:
    """Hits equal brute force up to ties: same score list, each id's own score, no one better left out."""
    true = unit(vectors) @ unit(query[None])[0]
    if allowed is not None:
        true = np.where(allowed, true, -np.inf)
    n_ok = int(np.isfinite(true).sum())
    expected = np.sort(true[np.isfinite(true)])[::-1][:k]
    assert len(hits) == min(k, n_ok)
    np.testing.assert_allclose([h["score"] for h in hits], expected, atol=TOL)
    index_of = {doc_id: i for i, doc_id in enumerate(ids)}
    for hit in hits:
        assert np.isfinite(true[index_of[hit["id"]]]), "a filtered-out document came back"
        assert abs(true[index_of[hit["id"]]] - hit["score"]) < TOL
    if hits:  # every doc clearly better than the last hit is among the hits
        clearly_better = {ids[i] for i in np.flatnonzero(true > hits[-1]["score"] + TOL)}
        assert clearly_better <= {h["id"] for h in hits}
    assert len({h["id"] for h in hits}) == len(hits)


def matches(meta: dict | None, field: str, value) -> bool:
    """The filter semantics, written independently of the SQL: type-aware equality."""
    if meta is None or field not in meta:
        return False
    actual = meta[field]
    for v in value if isinstance(value, list) else [value]:
        if v is None or isinstance(v, bool) or isinstance(actual, bool) or actual is None:
            if actual is v:
                return True
        elif (
            type(v) in (int, float)
            and type(actual) in (int, float)
            or isinstance(v, str)
            and isinstance(actual, str)
        ):
            if actual == v:
                return True
    return False


# --- exact search ----------------------------------------------------------------------------


@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_flat_search_equals_brute_force(store, seed, clustered):
    x = random_data(600, 24, seed, clustered=clustered)
    ids = ids_for(len(x))
    store.upsert("c", ids, x)
    queries = np.concatenate([x[:3], random_data(5, 24, seed + 100)])
    for q in queries:
        for k in (1, 10, 57):
            assert_exact(store.search("c", q, k), ids, x, q, k)
    # search_many agrees with search row by row
    many = store.search_many("c", queries, 10)
    assert [[h["id"] for h in hits] for hits in many] == [
        [h["id"] for h in store.search("c", q, 10)] for q in queries
    ]


def test_flat_filtered_search_equals_brute_force(store):
    rng = np.random.default_rng(3)
    x = random_data(800, 16, 3, clustered=True)
    ids = ids_for(len(x))
    pool = ["red", "blue", 1, 2, 2.5, True, False, None]
    meta = [
        None
        if i % 17 == 0
        else {
            "color": pool[int(rng.integers(0, len(pool)))],
            "shard": int(i % 4),
            "ok": bool(i % 3 == 0),
            **({"opt": None} if i % 5 == 0 else {}),
        }
        for i in range(len(x))
    ]
    store.upsert("c", ids, x, meta)
    filters = [
        {"color": "red"},
        {"color": ["red", 1]},
        {"color": True},
        {"color": 1},
        {"color": 2.0},
        {"color": None},
        {"opt": None},
        {"shard": [0, 3], "ok": True},
        {"ok": False, "color": ["blue", False]},
        {"color": "green"},
        {"missing": 1},
        {},
    ]
    for f in filters:
        allowed = np.array([all(matches(m, key, v) for key, v in f.items()) for m in meta])
        for q in (x[5], random_data(1, 16, 9)[0]):
            for k in (3, 50):
                hits = store.search("c", q, k, f)
                assert_exact(hits, ids, x, q, k, allowed)
                for hit in hits:
                    assert all(matches(hit["metadata"], key, v) for key, v in f.items())
    assert store.search("c", x[0], 10, {"color": "green"}) == []


def matches_filter(meta: dict | None, field: str, value) -> bool:
    """``matches`` plus the operators: numeric ranges and ``not``."""
    if not isinstance(value, dict):
        return matches(meta, field, value)
    ok = True
    ranges = {op: v for op, v in value.items() if op != "not"}
    if ranges:
        actual = None if meta is None else meta.get(field)
        if type(actual) not in (int, float):
            ok = False
        else:
            for op, v in ranges.items():
                ok &= {"gt": actual > v, "gte": actual >= v, "lt": actual < v, "lte": actual <= v}[op]
    if "not" in value:
        ok &= not matches(meta, field, value["not"])
    return ok


def test_range_and_not_filters(store):
    x = random_data(400, 8, 11)
    ids = ids_for(len(x))
    pool = [1, 2.5, 10, 10.0, 15, 19.99, 20, 25, "15", True, None, -3, 2**62]
    meta = [
        None
        if i % 13 == 0
        else {}
        if i % 17 == 0
        else {"price": pool[i % len(pool)], "c": ["red", "blue", 1, [1]][i % 4]}
        for i in range(len(x))
    ]
    store.upsert("c", ids, x, meta)
    filters = [
        {"price": {"gte": 10, "lt": 20}},
        {"price": {"gt": 10}},
        {"price": {"lte": 2.5}},
        {"price": {"gt": -5.5, "lte": 10.0}},
        {"price": {"gte": 2**61}},
        {"c": {"not": "red"}},
        {"c": {"not": ["red", 1]}},
        {"c": {"not": None}},
        {"price": {"gte": 10, "not": 15}},
        {"c": "blue", "price": {"lt": 20}},
        {"price": {"gt": 100, "lt": 0}},
    ]
    for f in filters:
        allowed = np.array([all(matches_filter(m, key, v) for key, v in f.items()) for m in meta])
        for q in (x[3], random_data(1, 8, 12)[0]):
            for k in (5, 400):
                assert_exact(store.search("c", q, k, f), ids, x, q, k, allowed)
    for bad in (
        {"price": {}},
        {"price": {"gte": "10"}},
        {"price": {"gte": True}},
        {"price": {"gte": float("nan")}},
        {"price": {"between": [1, 2]}},
        {"price": {"not": []}},
        {"price": {"not": {"gte": 1}}},
        {"price": {"gte": 2**64}},
    ):
        with pytest.raises(InvalidFilterError):
            store.search("c", x[0], 5, bad)


def test_filter_types_are_not_confused(store):
    docs = {
        "t": {"v": True},
        "one": {"v": 1},
        "onef": {"v": 1.0},
        "null": {"v": None},
        "absent": {},
        "str1": {"v": "1"},
        "none": None,
        "q": {'we"ird.key[0]': "x", "é k": 2},
    }
    store.upsert("c", list(docs), random_data(len(docs), 4, 0), list(docs.values()))

    def found(f):
        return {h["id"] for h in store.search("c", np.ones(4), 100, f)}

    assert found({"v": True}) == {"t"}
    assert found({"v": 1}) == {"one", "onef"}
    assert found({"v": 1.0}) == {"one", "onef"}
    assert found({"v": None}) == {"null"}
    assert found({"v": "1"}) == {"str1"}
    assert found({"v": [True, "1"]}) == {"t", "str1"}
    assert found({'we"ird.key[0]': "x"}) == {"q"}
    assert found({"é k": 2}) == {"q"}
    assert found({"v": False}) == set()


def test_k_larger_than_collection_and_k_limits(make_store):
    with make_store(max_k=50) as store:
        x = random_data(7, 8, 0)
        store.upsert("c", ids_for(7), x)
        assert len(store.search("c", x[0], 50)) == 7
        assert len(store.search("c", x[0], 50, {"nothing": 1})) == 0
        for k in (0, -1, 51, True, 2.5):
            with pytest.raises(InvalidParameterError):
                store.search("c", x[0], k)


# --- documents and collections ------------------------------------------------------------------


def test_upsert_replaces_vector_and_metadata(store):
    x = random_data(20, 8, 0)
    store.upsert("c", ids_for(20), x, [{"v": 1}] * 20)
    before = store.get("c", "doc-3")
    new_vector = random_data(1, 8, 42)
    assert store.upsert("c", ["doc-3", "doc-new"], np.concatenate([new_vector, x[:1]]), [{"v": 2}, None]) == [
        "doc-3",
        "doc-new",
    ]
    after = store.get("c", "doc-3", with_vector=True)
    assert after["created_at"] == before["created_at"]
    assert after["updated_at"] >= before["updated_at"]
    assert after["metadata"] == {"v": 2}
    np.testing.assert_allclose(after["vector"], unit(new_vector)[0], atol=1e-6)
    assert store.describe("c")["count"] == 21
    top = store.search("c", new_vector[0], 1)[0]
    assert top["id"] == "doc-3" and top["score"] == pytest.approx(1.0, abs=TOL)
    assert top["metadata"] == {"v": 2}
    assert "doc-3" not in {h["id"] for h in store.search("c", x[3], 21) if h["score"] > 1 - TOL}
    assert store.get("c", "doc-new")["metadata"] is None
    assert store.integrity_check() == []


def test_delete_get_describe_list(store):
    x = random_data(30, 8, 1)
    store.upsert("c", ids_for(30), x, [{"i": i} for i in range(30)])
    store.upsert("d", ["a"], random_data(1, 3, 0))
    assert store.get("c", "doc-4")["metadata"] == {"i": 4}
    store.delete("c", "doc-4")
    assert "doc-4" not in {h["id"] for h in store.search("c", x[4], 30)}
    with pytest.raises(DocumentNotFoundError):
        store.get("c", "doc-4")
    with pytest.raises(DocumentNotFoundError):
        store.delete("c", "doc-4")
    assert store.existing_ids("c", ["doc-4", "doc-5", "zzz"]) == {"doc-5"}
    assert store.existing_ids("nope", ["doc-5"]) == set()
    d = store.describe("c")
    assert {k: d[k] for k in ("name", "count", "dim", "index")} == {
        "name": "c",
        "count": 29,
        "dim": 8,
        "index": "flat",
    }
    assert [(c["name"], c["count"], c["dim"]) for c in store.list_collections()] == [
        ("c", 29, 8),
        ("d", 1, 3),
    ]
    store.delete_collection("c")
    assert [c["name"] for c in store.list_collections()] == ["d"]
    for call in (
        lambda: store.describe("c"),
        lambda: store.search("c", x[0]),
        lambda: store.get("c", "doc-5"),
        lambda: store.delete("c", "doc-5"),
        lambda: store.delete_collection("c"),
    ):
        with pytest.raises(CollectionNotFoundError):
            call()
    store.upsert("c", ["x"], random_data(1, 5, 0))  # recreated with another dim
    assert store.describe("c")["dim"] == 5 and store.describe("c")["count"] == 1
    assert store.integrity_check() == []


def test_create_collection_explicitly(store):
    info = store.create_collection("h", 8, "hnsw", {"ef_search": 64})
    assert info["index"] == "hnsw" and info["count"] == 0
    assert store.create_collection("h", 8, "hnsw")["name"] == "h"
    assert store.create_collection("h", 8, "hnsw", {"ef_search": 64})["name"] == "h"
    for args in (("h", 9, "hnsw"), ("h", 8, "flat"), ("h", 8, "hnsw", {"ef_search": 10})):
        with pytest.raises(CollectionExistsError):
            store.create_collection(*args)
    with pytest.raises(CollectionExistsError):
        store.create_collection("h", 8, "hnsw", exist_ok=False)
    with pytest.raises(CollectionExistsError):
        store.upsert("h", ["a"], random_data(1, 8, 0), index="ivf")
    for bad in (("x", 8, "annoy"), ("x", 0), ("x", 8, "hnsw", {"m": 0}), ("x", 8, "ivf", {"bogus": 1})):
        with pytest.raises(InvalidParameterError):
            store.create_collection(*bad)
    store.upsert("v", ["a"], random_data(1, 8, 0), index="ivf")
    assert store.describe("v")["index"] == "ivf"
    assert "x" not in {c["name"] for c in store.list_collections()}


# --- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", ".", "..", ".hidden", "-x", "x" * 129, "a b", "é", "a\n", None, 5]
)
def test_bad_collection_names(store, name):
    with pytest.raises(InvalidNameError):
        store.upsert(name, ["a"], np.ones((1, 4)))
    with pytest.raises(InvalidNameError):
        store.search(name, np.ones(4))
    assert store.list_collections() == []


@pytest.mark.parametrize("doc_id", ["", "x" * 513, "a\x00b", "tab\there", "del\x7f", "\ud800", 3, None])
def test_bad_document_ids(store, doc_id):
    with pytest.raises(InvalidNameError):
        store.upsert("c", [doc_id], np.ones((1, 4)))
    assert store.list_collections() == []


def test_unusual_but_valid_names_and_ids(store):
    odd_ids = ["x" * 512, "日本語 id", "../../etc/passwd", "a/b", "emoji 🚀", " "]
    store.upsert("A.b_c-9" + "x" * 121, odd_ids, random_data(len(odd_ids), 4, 0))
    assert store.existing_ids("A.b_c-9" + "x" * 121, odd_ids) == set(odd_ids)
    assert store.get("A.b_c-9" + "x" * 121, "日本語 id")["id"] == "日本語 id"


def test_vector_validation(store):
    store.upsert("c", ["a"], np.ones((1, 4)))
    bad_vectors = [
        np.array([[np.nan, 1, 1, 1]]),
        np.array([[np.inf, 1, 1, 1]]),
        np.zeros((1, 4)),
        np.array([[1e39, 1, 1, 1]]),
        [[1, 2], [1]],
        [["a", "b", "c", "d"]],
        np.ones(4),
    ]
    for bad in bad_vectors:
        with pytest.raises(InvalidVectorError):
            store.upsert("c", ["b"], bad)
    with pytest.raises(InvalidVectorError):
        store.upsert("c", ["b", "c"], np.ones((1, 4)))
    with pytest.raises(DimensionMismatchError):
        store.upsert("c", ["b"], np.ones((1, 5)))
    with pytest.raises(DuplicateIdError):
        store.upsert("c", ["b", "x", "b"], np.ones((3, 4)))
    for bad_query in (np.zeros(4), np.array([np.nan, 0, 0, 1]), np.ones((2, 4))):
        with pytest.raises(InvalidVectorError):
            store.search("c", bad_query)
    with pytest.raises(DimensionMismatchError):
        store.search("c", np.ones(3))
    with pytest.raises(CollectionNotFoundError):
        store.search("nope", np.ones(4))
    assert store.describe("c")["count"] == 1 and store.existing_ids("c", ["b", "x"]) == set()


def test_metadata_validation(make_store):
    with make_store(max_metadata_bytes=100) as store:
        for bad in ([1, 2], "text", {1: "x"}, {"x": float("nan")}, {"x": object()}, {"x": "y" * 200}):
            with pytest.raises(InvalidMetadataError):
                store.upsert("c", ["a"], np.ones((1, 4)), [bad])
        with pytest.raises(InvalidMetadataError):
            store.upsert("c", ["a", "b"], np.ones((2, 4)), [None])
        store.upsert("c", ["a"], np.ones((1, 4)), [{"nested": {"ok": [1, None, "ü"]}}])
        assert store.get("c", "a")["metadata"] == {"nested": {"ok": [1, None, "ü"]}}


@pytest.mark.parametrize(
    "bad",
    [
        {"a": {"b": 1}},
        {"a": []},
        {"a": [[1]]},
        {"a": [{"b": 1}]},
        {1: "x"},
        {"k" * 257: 1},
        {"": 1},
        {"a\x00": 1},
        {"a": float("nan")},
        {"a": 2**64},
        {"a": (1, 2)},
        ["a"],
        "a=1",
        {f"k{i}": 1 for i in range(33)},
    ],
)
def test_bad_filters(store, bad):
    store.upsert("c", ["a"], np.ones((1, 4)), [{"a": 1}])
    with pytest.raises(InvalidFilterError):
        store.search("c", np.ones(4), 5, bad)


# --- approximate indexes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,options", [("hnsw", {"ef_search": 64}), ("ivf", {"min_train": 300, "nprobe": 8})]
)
@pytest.mark.parametrize("ratio", [0.2, 0.95])  # compacted vs left with many tombstones
@pytest.mark.parametrize("reduced", [False, True])  # precision: FAISS sq8 / pgvector halfvec
def test_approximate_recall_and_never_deleted(make_store, backend, kind, options, ratio, reduced):
    if backend == "postgres" and ratio != 0.2:
        pytest.skip("no tombstones in pgvector's indexes: one ratio is enough")
    if reduced:  # the index ranks by 8/16-bit values; the scores checked below must still be exact
        options = {**options, "precision": REDUCED_PRECISION[backend]}
    with make_store(background_rebuild=False, tombstone_rebuild_ratio=ratio) as store:
        x = random_data(1500, 32, 5, clustered=True)
        ids = ids_for(len(x))
        meta = [{"part": i % 5} for i in range(len(x))]
        store.create_collection("c", 32, kind, options)
        for start in range(0, len(x), 500):
            store.upsert("c", ids[start : start + 500], x[start : start + 500], meta[start : start + 500])
        rng = np.random.default_rng(0)
        gone = set(rng.choice(len(x), 450, replace=False).tolist())
        for i in sorted(gone):
            store.delete("c", ids[i])
        replaced = [i for i in range(0, len(x), 7) if i not in gone]
        new_x = random_data(len(replaced), 32, 77, clustered=True)
        store.upsert("c", [ids[i] for i in replaced], new_x, [meta[i] for i in replaced])
        x[replaced] = new_x
        assert store.describe("c")["count"] == len(x) - len(gone)
        if backend == "sqlite":
            assert store._collections["c"].live.index.mode == kind  # trained / built, not the exact fallback
            assert store._collections["c"].live.index.reduced == reduced
        assert store.collection_options("c")["precision"] == options.get("precision", "float32")
        alive = np.array([i not in gone for i in range(len(x))])
        true = unit(x) @ unit(x[:40]).T
        recall = []
        for qi in range(40):
            for f in (None, {"part": [1, 3]}, {"part": 4}):
                allowed = alive & np.array(
                    [
                        f is None or m["part"] in (f["part"] if isinstance(f["part"], list) else [f["part"]])
                        for m in meta
                    ]
                )
                hits = store.search("c", x[qi], 10, f)
                assert len(hits) == 10
                got = {int(h["id"].split("-")[1]) for h in hits}
                assert all(allowed[i] for i in got), "deleted or filtered-out document returned"
                for h in hits:  # scores are the true cosine of the stored (current) vector
                    assert abs(true[int(h["id"].split("-")[1]), qi] - h["score"]) < TOL
                best = set(np.argsort(-np.where(allowed, true[:, qi], -np.inf))[:10].tolist())
                recall.append(len(got & best) / 10)
        assert np.mean(recall) >= 0.9
        assert store.integrity_check() == []


def test_ivf_exact_before_training(store, backend):
    x = random_data(50, 8, 2)
    store.create_collection("v", 8, "ivf", {"min_train": 1000})
    store.upsert("v", ids_for(50), x)
    if backend == "sqlite":
        assert store._collections["v"].live.index.mode == "exact"
    for q in x[:5]:
        assert_exact(store.search("v", q, 10), ids_for(50), x, q, 10)


def test_rebuild_catches_up_with_writes_made_during_the_build():
    """LiveIndex.rebuild journals changes made while it builds and replays them before swapping."""
    x = unit(random_data(3 * 4096, 8, 4)).astype(np.float32)  # several build chunks
    index = ApproximateIndex(8, "hnsw", {"m": 8, "ef_search": 64, "ef_construction": 40}, tombstone_ratio=0.2)
    live = LiveIndex(index)
    live.apply(np.empty(0, np.int64), np.arange(len(x), dtype=np.int64), x)
    live.apply(np.arange(3000, dtype=np.int64), np.empty(0, np.int64), np.empty((0, 8), np.float32))
    assert live.needs_rebuild()
    calls = []

    def write_meanwhile() -> bool:  # called between build chunks, with no lock held
        if not calls:
            with live.lock.write():
                live.apply(np.array([5000, 5001], np.int64), np.array([10**6], np.int64), x[:1])
        calls.append(1)
        return False

    live.rebuilding = True
    fresh = live.rebuild(write_meanwhile)
    assert fresh is live.index and len(calls) > 1 and not live.rebuilding
    expected = set(range(3000, len(x))) - {5000, 5001} | {10**6}
    assert set(live.index.labels().tolist()) == expected and live.index.tombstones == 2
    _, labels = live.index.search(x[:1], 1)
    assert labels[0, 0] == 10**6  # x[0] lives on under its new label only


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_sq8_rebuild_keeps_the_codes(kind):
    """A compaction/retraining rebuilds an sq8 index from its own decoded vectors: the kept
    quantizer must encode them to the same codes (no drift over repeated rebuilds)."""
    x = unit(random_data(3000, 16, 3, clustered=True)).astype(np.float32)
    labels = np.arange(3000, dtype=np.int64) * 2 + 1
    options = {**vector_index.OPTION_DEFAULTS[kind], "precision": "sq8"}
    live = LiveIndex(ApproximateIndex.build(16, kind, options, labels, x))
    assert live.index.reduced and live.index.candidates(10) > 10
    before_labels, before = live.index.live_items()
    assert 0 < np.abs(before - x).max() < 0.02  # 8-bit codes: close, not equal
    live.index.remove(labels[::3])
    for _ in range(3):
        fresh = live.rebuild()
        assert fresh is not None and fresh.reduced
        got_labels, got = fresh.live_items()
        keep = np.isin(before_labels, got_labels)
        order = np.argsort(got_labels)
        np.testing.assert_array_equal(got_labels[order], before_labels[keep])
        np.testing.assert_array_equal(got[order], before[keep])


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_filters_by_label_in_any_insertion_order(kind):
    x = unit(random_data(3000, 8, 6)).astype(np.float32)
    options = (
        {"m": 16, "ef_search": 64, "ef_construction": 40}
        if kind == "hnsw"
        else {"nlist": 16, "nprobe": 4, "min_train": 100}
    )
    ascending = np.arange(len(x), dtype=np.int64) * 3 + 7  # labels[i] belongs to x[i]
    for labels in (ascending, np.random.default_rng(0).permutation(ascending)):
        index = ApproximateIndex.build(8, kind, options, labels, x)
        assert index.mode == kind
        removed = labels[::4]
        index.remove(removed)
        for size in (None, 500):  # the approximate path with a selector; exact search on a small subset
            allowed = labels[labels % 2 == 1][:size]
            ok = np.isin(labels, allowed) & ~np.isin(labels, removed)
            _, got = index.search(x[:20], 10, allowed)
            assert set(got.ravel().tolist()) <= set(labels[ok].tolist())
            best = labels[np.argmax(np.where(ok, x[:20] @ x.T, -np.inf), axis=1)]
            assert np.mean(got[:, 0] == best) >= (1.0 if size else 0.8)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_selective_filter_on_approximate_index_is_still_complete(kind, monkeypatch):
    """With the exact-subset shortcut off, a very selective filter starves the approximate search;
    the store must then scan exhaustively rather than return too few hits."""
    monkeypatch.setattr(vector_index, "EXACT_SUBSET_MAX", 0)
    x = unit(random_data(3000, 16, 7, clustered=True)).astype(np.float32)
    labels = np.arange(len(x), dtype=np.int64)
    options = (
        {"m": 8, "ef_search": 16, "ef_construction": 40}
        if kind == "hnsw"
        else {"nlist": 32, "nprobe": 1, "min_train": 100}
    )
    index = ApproximateIndex.build(16, kind, options, labels, x)
    index.remove(labels[:100])
    allowed = labels[::97]  # 31 labels, 2 of them removed
    live = allowed[allowed >= 100]
    scores, got = index.search(x[200:230], len(live), allowed)
    for row_scores, row in zip(scores, got, strict=True):
        assert set(row.tolist()) == set(live.tolist())
        assert np.all(np.diff(row_scores) <= 1e-6)


# --- durability and failures ----------------------------------------------------------------------


def test_persistence_across_close_and_open(make_store, backend):
    x = random_data(400, 16, 8, clustered=True)
    ids = ids_for(len(x))
    queries = random_data(6, 16, 9)
    with make_store() as store:
        store.upsert("flat", ids, x, [{"i": i % 3} for i in range(len(x))])
        store.upsert("h", ids, x, index="hnsw")
        store.delete("flat", "doc-7")
        before = [store.search("flat", q, 10, {"i": [0, 2]}) for q in queries]
    with make_store() as store:
        assert store.wait_for_maintenance(timeout=60)
        assert [store.search("flat", q, 10, {"i": [0, 2]}) for q in queries] == before
        assert store.describe("flat")["count"] == 399 and store.describe("h")["count"] == 400
        assert store.describe("h")["index"] == "hnsw"
        if backend == "sqlite":
            assert store._collections["h"].live.index.mode == "hnsw"
        for i in range(0, 400, 37):
            assert store.search("h", x[i], 1)[0]["score"] == pytest.approx(1.0, abs=TOL)
        assert store.integrity_check() == []


def test_one_store_per_data_dir(data_dir):
    with CollectionStore(data_dir), pytest.raises(StoreUnavailableError):
        CollectionStore(data_dir).open()


def test_closed_store_refuses(make_store):
    store = make_store()
    with pytest.raises(StoreUnavailableError):
        store.search("c", np.ones(3))
    store.open()
    store.close()
    with pytest.raises(StoreUnavailableError):
        store.upsert("c", ["a"], np.ones((1, 3)))


def test_read_only_store_refuses_writes_and_keeps_data(data_dir):
    x = random_data(20, 8, 0)
    with CollectionStore(data_dir) as store:
        store.upsert("c", ids_for(20), x)
    with CollectionStore(data_dir, read_only=True) as store:
        assert len(store.search("c", x[0], 5)) == 5
        for write in (
            lambda: store.upsert("c", ["new"], x[:1]),
            lambda: store.delete("c", "doc-1"),
            lambda: store.upsert("other", ["new"], x[:1]),
            lambda: store.delete_collection("c"),
        ):
            with pytest.raises(StoreUnavailableError, match="readonly|read-only"):
                write()
        assert store.describe("c")["count"] == 20 and store.existing_ids("c", ["new"]) == set()
        assert [c["name"] for c in store.list_collections()] == ["c"]
    with CollectionStore(data_dir) as store:
        assert store.describe("c")["count"] == 20 and store.integrity_check() == []


def test_read_only_directory(data_dir):
    x = random_data(10, 4, 0)
    with CollectionStore(data_dir) as store:
        store.upsert("c", ids_for(10), x)
    modes = {p: p.stat().st_mode for p in [data_dir, *data_dir.iterdir()]}
    try:
        for p in modes:
            p.chmod(stat.S_IRUSR | stat.S_IXUSR if p.is_dir() else stat.S_IRUSR)
        if os.access(data_dir / "store.sqlite3", os.W_OK):
            pytest.skip("file permissions are not enforced for this user (root)")
        with pytest.raises(StoreUnavailableError):  # at open, or at the first write
            with CollectionStore(data_dir) as store:
                store.upsert("c", ["new"], x[:1])
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    with CollectionStore(data_dir) as store:
        assert store.describe("c")["count"] == 10 and store.integrity_check() == []


def test_full_disk_leaves_store_consistent(data_dir):
    rng = np.random.default_rng(0)
    with CollectionStore(data_dir, max_db_bytes=400_000) as store:
        acknowledged: list[str] = []
        with pytest.raises(StoreUnavailableError, match="full"):
            for batch in range(1000):
                ids = ids_for(20, f"b{batch}")
                acknowledged += store.upsert(
                    "c", ids, rng.standard_normal((20, 256)), [{"batch": batch}] * 20
                )
        failed = ids_for(20, f"b{batch}")
        assert store.describe("c")["count"] == len(acknowledged) > 0
        assert store.existing_ids("c", failed) == set()
        assert not {h["id"] for h in store.search("c", rng.standard_normal(256), 1000)} & set(failed)
        with pytest.raises(StoreUnavailableError):  # a new collection does not appear either
            store.upsert("other", ids_for(200), rng.standard_normal((200, 256)))
        assert [c["name"] for c in store.list_collections()] == ["c"]
        store.delete("c", acknowledged[0])  # deleting frees space and still works
        assert store.integrity_check() == []
    with CollectionStore(data_dir) as store:
        assert store.describe("c")["count"] == len(acknowledged) - 1
        assert store.existing_ids("c", acknowledged) == set(acknowledged[1:])
        assert store.integrity_check() == []


def test_integrity_check_notices_tampering(data_dir):
    with CollectionStore(data_dir) as store:
        store.upsert("c", ids_for(10), random_data(10, 4, 0))
        assert store.integrity_check() == []
        with sqlite3.connect(data_dir / "store.sqlite3") as conn:
            conn.execute("DELETE FROM documents WHERE id = 'doc-3'")
        problems = store.integrity_check()
        assert any("1 documents in the index but not in SQLite" in p for p in problems), problems


# --- concurrency -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_concurrent_writes_and_searches(make_store, kind):
    dim, writers, batches, per_batch = 16, 4, 15, 20
    errors: list[BaseException] = []
    with make_store(hnsw_m=8) as store:
        store.create_collection("c", dim, kind)
        store.upsert("c", ["seed"], np.ones((1, dim)))
        deleted: set[str] = set()

        def write(w: int) -> None:
            rng = np.random.default_rng(w)
            try:
                for b in range(batches):
                    ids = ids_for(per_batch, f"w{w}-b{b}")
                    store.upsert("c", ids, rng.standard_normal((per_batch, dim)), [{"w": w}] * per_batch)
                    store.delete("c", ids[0])
                    deleted.add(ids[0])
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        def search(r: int) -> None:
            rng = np.random.default_rng(100 + r)
            try:
                for _ in range(60):
                    hits = store.search("c", rng.standard_normal(dim), 20, {"w": [0, 1]} if r % 2 else None)
                    scores = [h["score"] for h in hits]
                    assert scores == sorted(scores, reverse=True) and len(hits) <= 20
                    assert len({h["id"] for h in hits}) == len(hits)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        threads += [threading.Thread(target=search, args=(r,)) for r in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert store.wait_for_maintenance(timeout=60)
        expected = 1 + writers * batches * (per_batch - 1)
        assert store.describe("c")["count"] == expected
        assert store.integrity_check() == []
        hits = store.search("c", np.ones(dim), 1000)
        assert len(hits) == min(1000, expected) and not {h["id"] for h in hits} & deleted


# --- sources: the text and thumbnails a document was made from ------------------------------------


def _raw_sql(store, backend, statements: list[str]) -> None:
    """Run SQL on the store's database behind its back (``{docs}``: the table of collection 'c')."""
    if backend == "sqlite":
        conn = sqlite3.connect(store.path, isolation_level=None)
        try:
            for sql in statements:
                conn.execute(sql.format(docs="documents"))
        finally:
            conn.close()
        return
    import psycopg

    with psycopg.connect(store.url, autocommit=True) as conn:
        serial = conn.execute("SELECT serial FROM llave_collections WHERE name = 'c'").fetchone()
        for sql in statements:
            conn.execute(sql.format(docs=f"llave_docs_{serial[0]}" if serial else "none"))


def test_sources_round_trip_with_real_thumbnails(store):
    import io

    from PIL import Image

    from service.storage.sources import Source, ThumbnailNotFoundError, source_of_input
    from tests.service.thumbnails import assert_thumbnail_of, image_with_corner, rotated_jpeg
    from tests.videos import make_clip

    wide, small, turned = image_with_corner(600, 300), image_with_corner(40, 90), rotated_jpeg(400, 200)
    options = {"thumbnail_size": 128, "thumbnail_format": "webp"}
    inputs = [
        {
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image", "image": wide},
                {"type": "text", "text": "b"},
            ]
        },
        {"image": small, "text": "small", "instruction": "Represent the image:"},
        {"image": turned},
        {"text": "only text", "instruction": "not content"},
        {"video": make_clip(30, 12, 64, 48), "text": "a clip"},  # 2.5 s; its first frame
    ]
    sources = [source_of_input(inp, options) for inp in inputs]
    assert [s.text for s in sources] == ["a\nb", "small", None, "only text", "a clip"]
    x = random_data(6, 8, 0)
    store.upsert("c", ids_for(6), x, sources=[*sources, None])
    assert store.describe("c")["store_source"] is True  # created by the upsert: the defaults
    got = [store.get("c", doc_id) for doc_id in ids_for(6)]
    assert [(g["text"], g["thumbnails"]) for g in got] == [
        ("a\nb", 1), ("small", 1), (None, 1), ("only text", 0), ("a clip", 1), (None, 0)
    ]  # fmt: skip
    # A video's poster keeps the duration; the other thumbnails are plain images.
    assert [g["videos"] for g in got] == [[], [], [], [], [{"thumbnail": 0, "seconds": 2.5}], []]
    poster = store.thumbnail("c", "doc-4")
    assert (poster.media_type, poster.seconds) == ("image/webp", 2.5)
    assert Image.open(io.BytesIO(poster.data)).size == (64, 48)  # never enlarged
    # Decoded independently: size (never enlarged) and mean colour of the original.
    assert_thumbnail_of(store.thumbnail("c", "doc-0", 0).data, wide, 128)
    assert_thumbnail_of(store.thumbnail("c", "doc-1").data, small, 128)
    upright = assert_thumbnail_of(store.thumbnail("c", "doc-2").data, turned, 128)
    assert upright.size[1] > upright.size[0]  # EXIF orientation 6: a 400x200 photo stands upright
    corner = np.asarray(upright, np.float64)
    h, w = corner.shape[:2]
    # rotated 90 degrees clockwise, the dark top-left block is now at the top right
    assert corner[: h // 8, -w // 8 :].mean() < 60 < corner[: h // 8, : w // 8].mean()
    assert store.thumbnail("c", "doc-0").media_type == "image/webp"
    with pytest.raises(ThumbnailNotFoundError):
        store.thumbnail("c", "doc-0", 1)
    with pytest.raises(ThumbnailNotFoundError):
        store.thumbnail("c", "doc-3", 0)
    with pytest.raises(DocumentNotFoundError):
        store.thumbnail("c", "nope", 0)

    assert store.search("c", x[4], 1, include=["thumbnail"])[0]["thumbnail"] == poster
    hits = store.search("c", x[0], 6, include=["text", "thumbnail"])
    assert hits[0]["id"] == "doc-0" and hits[0]["text"] == "a\nb"
    assert hits[0]["thumbnail"].data == store.thumbnail("c", "doc-0").data
    by_id = {h["id"]: h for h in hits}
    assert by_id["doc-3"]["thumbnail"] is None and by_id["doc-5"]["text"] is None
    assert set(store.search("c", x[0], 1)[0]) == {"id", "score", "metadata"}  # nothing unasked
    assert set(store.search("c", x[0], 1, include=["text"])[0]) == {"id", "score", "metadata", "text"}
    with pytest.raises(InvalidParameterError):
        store.search("c", x[0], 1, include=["vector"])

    docs, _ = store.list_documents("c", with_source=True)
    assert [d["source"] for d in docs] == [*sources, None]

    # Replacing a document replaces its source (none given: none kept); deleting drops it.
    store.upsert("c", ["doc-0"], x[:1])
    assert (store.get("c", "doc-0")["text"], store.get("c", "doc-0")["thumbnails"]) == (None, 0)
    store.delete("c", "doc-1")
    with pytest.raises(DocumentNotFoundError):
        store.thumbnail("c", "doc-1")
    store.upsert("c", ["doc-1"], x[1:2], sources=[Source("back")])
    assert (store.get("c", "doc-1")["text"], store.get("c", "doc-1")["thumbnails"]) == ("back", 0)
    assert store.integrity_check() == []


def test_store_source_false_keeps_none_and_options_change(store):
    from service.storage.sources import Source, make_thumbnail
    from tests.service.thumbnails import image_with_corner

    thumb = make_thumbnail(image_with_corner(64, 64), 32, "jpeg")
    info = store.create_collection("c", 4, source={"store_source": False})
    assert (info["store_source"], info["thumbnail_size"], info["thumbnail_format"]) == (False, 256, "webp")
    store.upsert("c", ["a"], np.eye(1, 4), sources=[Source("text", (thumb,))])
    assert (store.get("c", "a")["text"], store.get("c", "a")["thumbnails"]) == (None, 0)
    # The source options of an existing collection can change (the index ones cannot).
    info = store.create_collection("c", 4, source={"store_source": True, "thumbnail_format": "jpeg"})
    assert (info["store_source"], info["thumbnail_format"]) == (True, "jpeg")
    assert store.describe("c")["thumbnail_format"] == "jpeg"
    assert [c["store_source"] for c in store.list_collections()] == [True]
    store.upsert("c", ["a"], np.eye(1, 4), sources=[Source("text", (thumb,))])
    assert store.thumbnail("c", "a").media_type == "image/jpeg"
    with pytest.raises(CollectionExistsError):
        store.create_collection("c", 4, "hnsw", source={"store_source": False})
    assert store.describe("c")["store_source"] is True
    for bad in (
        {"thumbnail_size": 8},
        {"thumbnail_size": 4096},
        {"thumbnail_size": True},
        {"thumbnail_format": "png"},
        {"store_source": "yes"},
        {"colour": 1},
    ):
        with pytest.raises(InvalidParameterError):
            store.create_collection("d", 4, source=bad)
        assert "d" not in {c["name"] for c in store.list_collections()}


def test_source_limits_refuse_the_whole_batch(store):
    from service.storage.sources import (
        MAX_SOURCE_TEXT_BYTES,
        MAX_THUMBNAIL_BYTES_PER_DOCUMENT,
        Source,
        SourceTooLargeError,
        Thumbnail,
    )

    store.upsert("c", ["keep"], np.eye(1, 4))
    too_long = Source("é" * (MAX_SOURCE_TEXT_BYTES // 2 + 1))  # counted in UTF-8 bytes
    with pytest.raises(SourceTooLargeError):
        store.upsert("c", ["a", "b"], np.eye(2, 4), sources=[Source("fine"), too_long])
    big = Thumbnail("image/webp", b"x" * (MAX_THUMBNAIL_BYTES_PER_DOCUMENT // 2 + 1))
    with pytest.raises(SourceTooLargeError):
        store.upsert("c", ["a"], np.eye(1, 4), sources=[Source(None, (big, big))])
    with pytest.raises(InvalidParameterError):
        store.upsert("c", ["a"], np.eye(1, 4), sources=[Source("one"), Source("two")])
    for text in ("nul \x00 inside", "lone \ud800 surrogate"):  # neither backend could store them
        with pytest.raises(InvalidParameterError):
            store.upsert("c", ["a"], np.eye(1, 4), sources=[Source(text)])
    assert store.existing_ids("c", ["a", "b"]) == set() and store.describe("c")["count"] == 1
    from service.storage.sources import input_text

    assert input_text(["a\x00b", None, "c"]) == "ab\nc" and input_text([None]) is None


def test_source_and_vector_commit_together(store, backend):
    """A failure while writing the source rolls back the vector: one transaction."""
    from service.storage.sources import Source

    store.upsert("c", ["before"], np.eye(1, 4), sources=[Source("kept")])
    if backend == "sqlite":
        poison = [
            "CREATE TRIGGER poison BEFORE INSERT ON document_sources WHEN new.text = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
        ]
    else:
        poison = ["ALTER TABLE {docs} ADD CONSTRAINT poison CHECK (source_text IS DISTINCT FROM 'poison')"]
    _raw_sql(store, backend, poison)
    with pytest.raises(Exception):  # noqa: B017 (the backend's own error for a failed statement)
        store.upsert("c", ["new", "before"], np.eye(2, 4), sources=[Source("fine"), Source("poison")])
    assert store.existing_ids("c", ["new"]) == set() and store.describe("c")["count"] == 1
    assert store.get("c", "before")["text"] == "kept"
    assert [h["id"] for h in store.search("c", np.eye(1, 4)[0], 5)] == ["before"]


def test_database_of_the_previous_version_opens_and_migrates(make_store, backend):
    """A data dir / database written before sources existed: opened, migrated, nothing lost;
    its collections keep no sources until asked to."""
    from service.storage.sources import Source

    x = random_data(6, 8, 3)
    with make_store(background_rebuild=False) as store:
        store.upsert("c", ids_for(6), x, [{"i": i} for i in range(6)])
        if backend == "sqlite":
            old = [
                "DROP TRIGGER documents_source_gone",
                "DROP TABLE document_sources",
                "DROP TABLE document_thumbnails",
                "ALTER TABLE collections DROP COLUMN source",
            ]
        else:
            old = [
                "ALTER TABLE {docs} DROP COLUMN source_text, DROP COLUMN thumbnails, DROP COLUMN thumbnail_types",
                "ALTER TABLE llave_collections DROP COLUMN source",
            ]
    _raw_sql(store, backend, old)
    if backend == "sqlite":  # read-only (service.migrate's source): opens without migrating
        with make_store(read_only=True) as ro:
            assert ro.get("c", "doc-1")["text"] is None and ro.describe("c")["store_source"] is False
            assert ro.search("c", x[1], 1, include=["text", "thumbnail"])[0]["thumbnail"] is None
            assert ro.list_documents("c", with_source=True)[0][0]["source"] is None
    with make_store(background_rebuild=False) as store:
        assert store.describe("c")["count"] == 6 and store.describe("c")["store_source"] is False
        assert store.get("c", "doc-1") | {"created_at": 0, "updated_at": 0} == {
            "id": "doc-1", "metadata": {"i": 1}, "created_at": 0, "updated_at": 0, "text": None, "thumbnails": 0,
            "videos": [],
        }  # fmt: skip
        assert_exact(store.search("c", x[2], 3), ids_for(6), x, x[2], 3)
        store.upsert("c", ["doc-1"], x[1:2], sources=[Source("ignored")])  # store_source is off
        assert store.get("c", "doc-1")["text"] is None
        store.create_collection("c", 8, source={"store_source": True})
        store.upsert("c", ["doc-1"], x[1:2], sources=[Source("kept")])
        store.upsert("new", ["a"], x[:1], sources=[Source("new")])
        assert store.get("c", "doc-1")["text"] == "kept" and store.get("new", "a")["text"] == "new"
    with make_store(background_rebuild=False) as store:  # and once more: the migration is idempotent
        assert store.get("c", "doc-1")["text"] == "kept" and store.describe("new")["store_source"] is True
        assert store.integrity_check() == []
