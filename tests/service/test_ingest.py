"""Bulk ingestion: folders and JSON lines, through a server or straight into the store."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from model import load_embedder
from service.ingest import IngestError, Row, ServerTarget, StoreTarget, ingest
from service.storage.store import CollectionStore
from tests.conftest import make_png
from tests.service.conftest import REPO, start_server
from tests.service.thumbnails import assert_thumbnail_of


@pytest.fixture(scope="module")
def srv(tiny_checkpoint, tmp_path_factory):
    server = start_server(
        tiny_checkpoint, tmp_path_factory.mktemp("server-ingest"), "--preprocess-workers", "2"
    )
    yield server
    server.stop()


def _image_folder(root):
    colours = {"red": (220, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 220)}
    for i, (name, rgb) in enumerate(colours.items()):
        sub = root / ("sub" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{name}.png").write_bytes(make_png(40 + 10 * i, 48, rgb))
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_through_server_is_resumable(srv, tiny_checkpoint, tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    cmd = [
        sys.executable,
        "-m",
        "service.ingest",
        "--collection",
        "pics",
        str(folder),
        "--server",
        srv.url,
        "--batch-size",
        "2",
        "--no-progress",
    ]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(first.stdout.strip().splitlines()[-1]) == {
        "collection": "pics",
        "added": 3,
        "skipped": 0,
        "failed": 0,
    }
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(second.stdout.strip().splitlines()[-1])["skipped"] == 3
    with srv.client() as c:
        assert c.get("/collections/pics").json()["count"] == 3
        doc = c.get("/collections/pics/documents/sub/green.png")
        assert doc.status_code == 200 and doc.json()["metadata"] == {"path": "sub/green.png"}
        assert (doc.json()["text"], doc.json()["thumbnails"]) == (None, 1)  # the server kept its source
        thumb = c.get("/collections/pics/documents/sub/green.png/thumbnail")
        assert_thumbnail_of(thumb.content, (folder / "sub" / "green.png").read_bytes(), 256)
        # The stored vector is the model's embedding of that file.
        vec = np.asarray(
            c.get("/collections/pics/documents/red.png", params={"with_vector": True}).json()["vector"]
        )
    ref = load_embedder(tiny_checkpoint, device="cpu").embed([{"image": (folder / "red.png").read_bytes()}])[
        0
    ]
    np.testing.assert_allclose(vec, ref, atol=1e-5)


def test_jsonl_bad_rows_are_reported_with_line_numbers(srv, tmp_path):
    (tmp_path / "a.png").write_bytes(make_png(32, 32))
    lines = [
        {"id": "t1", "text": "a red circle", "metadata": {"k": 1}},
        "this is not json",
        {"id": "i1", "image": "a.png"},
        {"text": "no id"},
        {"id": "v1", "vector": [0.0] * 64},  # all zeros: refused by the store
        {"id": "i2", "image": "missing.png"},
        {"id": "t1", "text": "repeated id in the same chunk"},
        {"id": "t2", "text": "fine", "colour": "extra field"},
    ]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    target = ServerTarget(srv.url, "lines", None)
    try:
        report = ingest(src, target, batch_size=16, progress=False)
    finally:
        target.close()
    assert report.added == 2  # t1 and i1
    joined = "\n".join(report.failed)
    for lineno in (2, 4, 5, 6, 7, 8):
        assert f"docs.jsonl:{lineno}:" in joined, joined
    assert len(report.failed) == 6
    target = ServerTarget(srv.url, "lines", None)
    try:
        with pytest.raises(Exception, match="docs.jsonl:2"):
            ingest(src, target, batch_size=16, on_error="stop", progress=False)
    finally:
        target.close()


def test_direct_store_mode(tiny_checkpoint, tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    data = tmp_path / "data"
    target = StoreTarget(data, "direct", str(tiny_checkpoint), "cpu", "float32")
    try:
        report = ingest(folder, target, progress=False)
        assert report.added == 3
        assert ingest(folder, target, progress=False).skipped == 3
        # raw vectors and inputs to embed in one batch: the server's upsert path
        raw = np.zeros(64)
        raw[3] = 5.0
        target.upsert(
            [
                Row("extra", "test", {"id": "extra", "text": "a caption", "instruction": "Describe:"}),
                Row("raw", "test", {"id": "raw", "vector": raw.tolist()}),
            ]
        )
        with pytest.raises(IngestError, match="dimensions"):
            target.upsert(
                [
                    Row("short", "test", {"id": "short", "vector": [1.0, 0.0]}),
                    Row("t", "t", {"id": "t", "text": "x"}),
                ]
            )
        with pytest.raises(IngestError, match="float32|infinite"):
            target.upsert([Row("huge", "test", {"id": "huge", "vector": [1e39] + [0.0] * 63})])
    finally:
        target.close()
    store = CollectionStore(data)
    store.open()
    try:
        assert store.describe("direct")["count"] == 5 and store.describe("direct")["store_source"] is True
        assert store.integrity_check() == []
        red = (folder / "red.png").read_bytes()
        assert store.get("direct", "red.png")["thumbnails"] == 1
        assert_thumbnail_of(store.thumbnail("direct", "red.png").data, red, 256)
        assert store.get("direct", "extra")["text"] == "a caption"  # the instruction is not content
        assert (store.get("direct", "raw")["text"], store.get("direct", "raw")["thumbnails"]) == (None, 0)
        np.testing.assert_allclose(
            store.get("direct", "raw", with_vector=True)["vector"], raw / 5.0, atol=1e-7
        )
        # normalised once, by the store: the model's unit embedding
        ref = load_embedder(tiny_checkpoint, device="cpu").embed([{"image": red}])[0]
        np.testing.assert_allclose(store.get("direct", "red.png", with_vector=True)["vector"], ref, atol=1e-5)
    finally:
        store.close()


def test_direct_postgres_store_mode(tiny_checkpoint, tmp_path, postgres_url):
    """``--store-url``: straight into PostgreSQL (servers on it may keep running)."""
    from service.ingest import main as ingest_main
    from service.storage.postgres import PostgresCollectionStore

    folder = _image_folder(tmp_path / "imgs")
    args = ["--collection", "pgdirect", "--store-url", postgres_url, "--model", str(tiny_checkpoint)]
    args += ["--device", "cpu", "--dtype", "float32", "--no-progress"]
    assert ingest_main([str(folder), *args]) == 0
    assert ingest_main([str(folder), *args]) == 0  # resumed: everything already there
    with PostgresCollectionStore(postgres_url) as store:
        assert store.describe("pgdirect")["count"] == 3
        assert store.integrity_check() == []
        blue = (folder / "blue.png").read_bytes()
        assert_thumbnail_of(store.thumbnail("pgdirect", "blue.png").data, blue, 256)


def test_missing_source_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.ingest",
            "--collection",
            "x",
            str(tmp_path / "nope"),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "no such folder or file" in r.stderr


def test_one_upsert_path_assembles_vectors_in_document_order():
    """``service/storage/documents.py``, used by the HTTP route and by ingest alike."""
    from service.storage.documents import assemble_vectors, check_unique_ids
    from service.storage.errors import DimensionMismatchError, DuplicateIdError, InvalidVectorError

    embedded = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    out = assemble_vectors([None, [7.0, 8.0, 9.0], None], embedded, [0, 2])
    np.testing.assert_array_equal(out, [[1, 2, 3], [7, 8, 9], [4, 5, 6]])
    assert out.dtype == np.float32  # not normalised: the store does that, once
    with pytest.raises(DimensionMismatchError, match=r"\[2, 3\]"):
        assemble_vectors([None, [1.0, 2.0]], embedded[:1], [0])
    with pytest.raises(InvalidVectorError, match="document 1"):
        assemble_vectors([[1.0, 0.0], [3.5e38, 1e39]])  # beyond float32: refused, not stored as inf
    with pytest.raises(InvalidVectorError):
        assemble_vectors([None, None], embedded[:1], [0])  # a document with neither
    assert check_unique_ids(["a", "b"]) == ["a", "b"]
    with pytest.raises(DuplicateIdError, match="'a'"):
        check_unique_ids(["a", "b", "a"])
