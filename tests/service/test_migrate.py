"""``python -m service.migrate``: SQLite data dir -> PostgreSQL -> SQLite, resumable, verified."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service import migrate as migrate_mod
from service.storage.postgres import PostgresCollectionStore
from service.storage.sources import Source, make_thumbnail, make_video_thumbnail
from service.storage.store import CollectionStore
from tests.service.thumbnails import image_with_corner
from tests.videos import make_clip


def _sources(n: int) -> list[Source | None]:
    """Texts for most documents, real thumbnails (one or two) for some, nothing for a few;
    one thumbnail in three is a video's poster frame, which keeps the video's duration."""
    thumbs = [
        make_thumbnail(image_with_corner(90, 60, colour), 32, fmt)
        for colour, fmt in (((200, 40, 40), "webp"), ((40, 200, 40), "jpeg"))
    ]
    thumbs.append(make_video_thumbnail(make_clip(15, 6, 48, 32), 32, "webp"))
    assert thumbs[-1].seconds == 2.5
    out: list[Source | None] = []
    for i in range(n):
        if i % 7 == 0:
            out.append(None)
        else:
            images = tuple(thumbs[i % 3 : i % 3 + (1 + i % 2)]) if i % 3 else ()
            out.append(Source(f"document {i}\nline two" if i % 5 else None, images))
    return out


def _fill(store) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    data = {}
    for name, dim, kind, options, source in (
        ("flat", 12, "flat", None, None),
        ("h", 16, "hnsw", {"m": 8, "ef_search": 40}, {"thumbnail_size": 64, "thumbnail_format": "jpeg"}),
        ("v", 8, "ivf", {"min_train": 50, "nprobe": 2}, {"store_source": False}),
    ):
        store.create_collection(name, dim, kind, options, source=source)
        x = rng.standard_normal((1234, dim)).astype(np.float32)
        ids = [f"{name}-{i:05d}" for i in range(len(x))]
        meta = [None if i % 11 == 0 else {"i": i, "tag": ["a", "b"][i % 2], "ü": 1.5} for i in range(len(x))]
        sources = _sources(len(x))
        for start in range(0, len(x), 400):
            end = start + 400
            store.upsert(name, ids[start:end], x[start:end], meta[start:end], sources=sources[start:end])
        data[name] = x
    store.upsert("empty-after-delete", ["only"], np.ones((1, 3)))
    store.delete("empty-after-delete", "only")
    return data


def _same(a, b) -> None:
    assert a.list_collections() and [{**c, "created_at": 0} for c in a.list_collections()] == [
        {**c, "created_at": 0} for c in b.list_collections()
    ]  # counts, dims, index types and source options
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
            docs_a, cursor_a = a.list_documents(name, cursor_a, 300, with_vector=True, with_source=True)
            docs_b, cursor_b = b.list_documents(name, cursor_b, 300, with_vector=True, with_source=True)
            assert [d["id"] for d in docs_a] == [d["id"] for d in docs_b]
            assert [d["metadata"] for d in docs_a] == [d["metadata"] for d in docs_b]
            assert [d["source"] for d in docs_a] == [d["source"] for d in docs_b]  # text, thumbnail bytes
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
        expected = _sources(1234)
        assert pg.get("flat", "flat-00004")["text"] == expected[4].text and expected[4].thumbnails
        assert pg.thumbnail("flat", "flat-00004").data == expected[4].thumbnails[0].data
        assert pg.describe("v")["store_source"] is False and pg.get("v", "v-00004")["text"] is None
        assert pg.describe("h")["thumbnail_format"] == "jpeg"
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
        pg.upsert("c", ["b"], np.eye(2, 4)[1:], [{"x": 2}], sources=[Source("drifted")])
        with pytest.raises(migrate_mod.MigrationError, match="source"):
            migrate_mod.verify_collection(src, pg, "c")
        pg.create_collection("c", 4, source={"thumbnail_size": 99})
        with pytest.raises(migrate_mod.MigrationError, match="thumbnail_size"):
            migrate_mod.verify_collection(src, pg, "c")
        pg.upsert("c", ["extra"], np.ones((1, 4)))
        with pytest.raises(migrate_mod.MigrationError, match="count"):
            migrate_mod.verify_collection(src, pg, "c")


def test_reduced_precision_becomes_the_other_backends_own(tmp_path, postgres_url):
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    ids = [f"v{i}" for i in range(40)]
    embedded = CollectionStore(tmp_path / "a")
    embedded.open()
    pg = PostgresCollectionStore(postgres_url)
    pg.open()
    back = CollectionStore(tmp_path / "b")
    back.open()
    try:
        embedded.create_collection("sq", 8, "hnsw", {"precision": "sq8"})
        embedded.upsert("sq", ids, vectors, [None] * 40)
        migrate_mod.copy_collection(embedded, pg, "sq")
        assert pg.collection_options("sq")["precision"] == "halfvec"
        migrate_mod.copy_collection(pg, back, "sq")
        assert back.collection_options("sq")["precision"] == "sq8"
        hits = back.search("sq", vectors[5], k=1)
        assert hits[0]["id"] == "v5"
    finally:
        embedded.close()
        pg.close()
        back.close()
