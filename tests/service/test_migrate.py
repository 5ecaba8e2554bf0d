"""``python -m service.migrate``: SQLite data dir -> PostgreSQL -> SQLite, resumable, verified."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service import migrate as migrate_mod
from service.storage.postgres import PostgresCollectionStore
from service.storage.store import CollectionStore


def _fill(store) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    data = {}
    for name, dim, kind, options in (
        ("flat", 12, "flat", None),
        ("h", 16, "hnsw", {"m": 8, "ef_search": 40}),
        ("v", 8, "ivf", {"min_train": 50, "nprobe": 2}),
    ):
        store.create_collection(name, dim, kind, options)
        x = rng.standard_normal((1234, dim)).astype(np.float32)
        ids = [f"{name}-{i:05d}" for i in range(len(x))]
        meta = [None if i % 11 == 0 else {"i": i, "tag": ["a", "b"][i % 2], "ü": 1.5} for i in range(len(x))]
        for start in range(0, len(x), 400):
            store.upsert(name, ids[start : start + 400], x[start : start + 400], meta[start : start + 400])
        data[name] = x
    store.upsert("empty-after-delete", ["only"], np.ones((1, 3)))
    store.delete("empty-after-delete", "only")
    return data


def _same(a, b) -> None:
    assert [(c["name"], c["count"], c["dim"], c["index"]) for c in a.list_collections()] == [
        (c["name"], c["count"], c["dim"], c["index"]) for c in b.list_collections()
    ]
    for info in a.list_collections():
        name = info["name"]
        assert (
            a.collection_options(name).items()
            >= {
                k: v for k, v in b.collection_options(name).items() if k in a.collection_options(name)
            }.items()
        )
        cursor_a = cursor_b = None
        while True:
            docs_a, cursor_a = a.list_documents(name, cursor_a, 300, with_vector=True)
            docs_b, cursor_b = b.list_documents(name, cursor_b, 300, with_vector=True)
            assert [d["id"] for d in docs_a] == [d["id"] for d in docs_b]
            assert [d["metadata"] for d in docs_a] == [d["metadata"] for d in docs_b]
            for x, y in zip(docs_a, docs_b, strict=True):
                # the target's upsert normalises again: equal within float32 rounding
                np.testing.assert_allclose(x["vector"], y["vector"], rtol=0, atol=1e-7)
            if cursor_a is None:
                assert cursor_b is None
                break


def test_migrate_to_postgres_resumable_and_back(tmp_path, postgres_url, monkeypatch, capsys):
    src_dir, back_dir = tmp_path / "data", tmp_path / "back"
    with CollectionStore(src_dir) as src:
        data = _fill(src)
        exact_before = src.search("flat", data["flat"][7], 10, {"tag": "b"})

    # an interrupted run: the third page fails; the rerun skips what was copied
    real_upsert = PostgresCollectionStore.upsert
    calls = {"n": 0}

    def failing_upsert(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("connection lost (simulated)")
        return real_upsert(self, *args, **kwargs)

    monkeypatch.setattr(PostgresCollectionStore, "upsert", failing_upsert)
    assert migrate_mod.main(["--from", str(src_dir), "--to", postgres_url, "--page", "500"]) == 1
    monkeypatch.setattr(PostgresCollectionStore, "upsert", real_upsert)
    capsys.readouterr()
    assert migrate_mod.main(["--from", str(src_dir), "--to", postgres_url, "--page", "500"]) == 0
    report = {r["collection"]: r for r in json.loads(capsys.readouterr().out)["collections"]}
    assert report["flat"]["skipped"] == 1000 and report["flat"]["copied"] == 234
    assert report["h"]["copied"] == 1234 and report["empty-after-delete"]["copied"] == 0

    with CollectionStore(src_dir, read_only=True) as src, PostgresCollectionStore(postgres_url) as pg:
        _same(src, pg)
        assert pg.collection_options("h")["m"] == 8 and pg.collection_options("v")["nprobe"] == 2
        hits = pg.search("flat", data["flat"][7], 10, {"tag": "b"})
        assert [h["id"] for h in hits] == [h["id"] for h in exact_before]
        np.testing.assert_allclose([h["score"] for h in hits], [h["score"] for h in exact_before], atol=1e-5)
        assert pg.integrity_check() == []

    assert migrate_mod.main(["--from", postgres_url, "--to", str(back_dir)]) == 0
    with PostgresCollectionStore(postgres_url) as pg, CollectionStore(back_dir) as back:
        _same(pg, back)
        assert back.describe("h")["index"] == "hnsw" and back.collection_options("h")["ef_search"] == 40
        assert back.integrity_check() == []


def test_verification_catches_a_difference(tmp_path, postgres_url):
    with CollectionStore(tmp_path / "d") as src, PostgresCollectionStore(postgres_url) as pg:
        src.upsert("c", ["a", "b"], np.eye(2, 4), [{"x": 1}, {"x": 2}])
        migrate_mod.migrate(src, pg)
        pg.upsert("c", ["b"], np.ones((1, 4)), [{"x": 2}])  # the target drifted
        with pytest.raises(migrate_mod.MigrationError, match="vector differs"):
            migrate_mod.verify_collection(src, pg, "c")
        pg.upsert("c", ["extra"], np.ones((1, 4)))
        with pytest.raises(migrate_mod.MigrationError, match="count"):
            migrate_mod.verify_collection(src, pg, "c")
