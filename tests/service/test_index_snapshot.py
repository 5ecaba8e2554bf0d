"""Approximate indexes saved at close and loaded at open: used only when they match exactly."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from service.storage import snapshots as index_snapshot
from service.storage.store import DB_FILE, CollectionStore
from tests.service.test_store import ids_for, random_data

KINDS = [("hnsw", {"ef_search": 64}), ("ivf", {"min_train": 300, "nprobe": 8})]


def fill(data_dir, kind, options, n=1200, dim=16):
    """A collection with deletes and replacements (tombstones), closed cleanly."""
    x = random_data(n, dim, 3, clustered=True)
    with CollectionStore(data_dir, background_rebuild=False, tombstone_rebuild_ratio=0.9) as store:
        store.create_collection("c", dim, kind, options)
        store.upsert("c", ids_for(n), x, [{"i": i} for i in range(n)])
        for i in range(0, n, 10):
            store.delete("c", f"doc-{i}")
        x[1::10] = random_data(len(x[1::10]), dim, 4, clustered=True)
        store.upsert("c", [f"doc-{i}" for i in range(1, n, 10)], x[1::10])
        assert store._collections["c"].live.index.mode == kind
        queries = x[:25]
        before = [store.search("c", q, 10) for q in queries]
    return queries, before


def reopen(data_dir, **kwargs) -> CollectionStore:
    store = CollectionStore(data_dir, background_rebuild=False, tombstone_rebuild_ratio=0.9, **kwargs)
    store.open()
    return store


@pytest.mark.parametrize("kind,options", KINDS)
def test_a_clean_close_saves_the_index_and_open_uses_it(tmp_path, kind, options, caplog):
    queries, before = fill(tmp_path, kind, options)
    assert (index_snapshot.snapshot_path(tmp_path, "c") / "meta.json").exists()
    with caplog.at_level("INFO", logger="llave.store"):
        store = reopen(tmp_path)
    try:
        index = store._collections["c"].live.index
        assert index.mode == kind  # no exact fallback, no rebuild
        assert "loaded the saved" in caplog.text and "rebuilt" not in caplog.text
        assert [store.search("c", q, 10) for q in queries] == before
        assert index.tombstones > 0  # saved as it was, tombstones included
        store.upsert("c", ["new"], random_data(1, 16, 9))  # still a working index
        assert store.search("c", random_data(1, 16, 9)[0], 1)[0]["id"] == "new"
        assert store.integrity_check() == []
    finally:
        store.close()


@pytest.mark.parametrize("kind,options", KINDS)
def test_a_snapshot_older_than_the_table_is_not_used(tmp_path, kind, options, caplog):
    queries, _ = fill(tmp_path, kind, options)
    # A write the snapshot never saw (as after a crash): one document gone, one new.
    x_new = random_data(1, 16, 11)
    vector = (x_new[0] / np.linalg.norm(x_new[0])).astype(np.float32).tobytes()
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        conn.execute("DELETE FROM documents WHERE id = 'doc-5'")
        conn.execute(
            "INSERT INTO documents (collection, id, metadata, created_at, updated_at, vector) "
            "VALUES ('c', 'fresh', NULL, 0, 0, ?)",
            (vector,),
        )
    with caplog.at_level("INFO", logger="llave.store"):
        store = reopen(tmp_path)
    try:
        assert "changed since it was saved" in caplog.text
        assert store.search("c", x_new[0], 1)[0]["id"] == "fresh"
        hits = {h["id"] for q in queries for h in store.search("c", q, 20)}
        assert "doc-5" not in hits
        assert store.integrity_check() == []
    finally:
        store.close()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "labels"])
def test_a_damaged_snapshot_falls_back_to_a_rebuild(tmp_path, damage, caplog):
    queries, before = fill(tmp_path, "hnsw", {"ef_search": 64})
    path = index_snapshot.snapshot_path(tmp_path, "c")
    if damage == "truncate":
        data = (path / "index.faiss").read_bytes()
        (path / "index.faiss").write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        size = (path / "index.faiss").stat().st_size
        (path / "index.faiss").write_bytes(b"\x00" * size)
    else:
        labels = np.load(path / "labels.npy")
        alive = np.load(path / "alive.npy")
        labels[np.flatnonzero(alive)[0]] = 10**9  # a live entry with a row id the table lacks
        np.save(path / "labels.npy", labels)
    with caplog.at_level("INFO", logger="llave.store"):
        store = reopen(tmp_path)
    try:
        assert "loaded the saved" not in caplog.text
        assert store._collections["c"].live.index.mode == "hnsw"  # rebuilt (inline here)
        got = [store.search("c", q, 10) for q in queries]
        kept = [i for i in range(len(queries)) if i % 10]  # doc-0, doc-10, doc-20 were deleted
        assert all(got[i][0]["score"] > 0.9999 for i in kept)  # each stored vector is found again
        assert [g[0]["score"] for g in got] == pytest.approx([b[0]["score"] for b in before], abs=1e-5)
    finally:
        store.close()


def test_changed_options_or_snapshots_off_mean_no_snapshot(tmp_path, caplog):
    fill(tmp_path, "hnsw", {"ef_search": 64})
    with caplog.at_level("INFO", logger="llave.store"):
        store = reopen(tmp_path, index_snapshots=False)
        store.close()
    assert "loaded the saved" not in caplog.text
    # the options recorded for the collection no longer match the snapshot's
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        conn.execute(
            "UPDATE collections SET options = ? WHERE name = 'c'",
            ('{"m": 32, "ef_search": 32, "ef_construction": 160}',),
        )
    caplog.clear()
    with caplog.at_level("INFO", logger="llave.store"):
        store = reopen(tmp_path)
        store.close()
    assert "its options differ" in caplog.text


def test_deleted_collections_lose_their_snapshot_and_read_only_stores_write_none(tmp_path):
    fill(tmp_path, "hnsw", {"ef_search": 64})
    path = index_snapshot.snapshot_path(tmp_path, "c")
    store = reopen(tmp_path, read_only=True)
    assert store._collections["c"].live.index.mode == "hnsw"  # a read-only store still loads it
    store.close()
    store = reopen(tmp_path)
    store.delete_collection("c")
    store.close()
    assert not path.exists()
    assert not any(index_snapshot.snapshot_root(tmp_path).iterdir())


def test_a_restarted_server_reuses_its_saved_index(tiny_checkpoint, tmp_path):
    from tests.service.conftest import start_server

    x = random_data(400, 16, 21, clustered=True)
    docs = [{"id": f"d{i}", "vector": [float(v) for v in row]} for i, row in enumerate(x)]
    queries = [
        {"collection": "h", "query": {"vector": docs[i]["vector"]}, "k": 5}
        for i in range(1, 400, 23)
        if not 200 <= i < 210
    ]
    # (random_data's rows 200-209 duplicate row 0: skipped, so no query has tied answers)

    def search(srv):
        with srv.client() as c:
            return [c.post("/search", json=q).json()["hits"] for q in queries]

    srv = start_server(tiny_checkpoint, tmp_path, "--log-level", "info")
    try:
        with srv.client() as c:
            assert c.put("/collections/h", json={"dim": 16, "index": "hnsw"}).status_code < 300
            for start in range(0, len(docs), 100):
                r = c.post("/collections/h/documents", json={"documents": docs[start : start + 100]})
                assert r.status_code == 200, r.text
        before = search(srv)
    finally:
        srv.stop()  # SIGTERM: a clean shutdown writes the snapshot
    assert (index_snapshot.snapshot_path(tmp_path / "data", "h") / "meta.json").exists()

    srv = start_server(tiny_checkpoint, tmp_path, "--log-level", "info")
    try:
        assert "loaded the saved hnsw index of 'h' (400 vectors)" in srv.log()
        assert search(srv) == before
    finally:
        srv.stop()

    srv = start_server(tiny_checkpoint, tmp_path, "--log-level", "info", "--no-index-snapshots")
    try:
        assert "loaded the saved" not in srv.log()
        assert [h[0]["id"] for h in search(srv)] == [h[0]["id"] for h in before]
    finally:
        srv.stop()
