"""Collections and search over HTTP, against the real server (tiny checkpoint)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import math

import numpy as np
import pytest

from model import load_embedder
from tests.conftest import b64, make_png
from tests.service.conftest import API_KEY, start_server
from tests.service.thumbnails import assert_thumbnail_of, image_with_corner, rotated_jpeg


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def srv(request, tiny_checkpoint, tmp_path_factory):
    """The same routes on both store backends: embedded SQLite + FAISS, and PostgreSQL + pgvector."""
    env = {}
    if request.param == "postgres":
        env["LLAVE_STORE_URL"] = request.getfixturevalue("postgres_server").new_database("api_collections")
    server = start_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("server-collections"),
        "--max-batch-size",
        "8",
        "--max-inputs-per-request",
        "64",
        "--preprocess-workers",
        "2",
        env=env,
    )
    yield server
    server.stop()


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_upsert_inputs_and_search_equals_exact_search(srv, tiny_checkpoint):
    docs = [
        {"id": "t-red", "text": "a red circle", "metadata": {"colour": "red", "kind": "text"}},
        {"id": "t-blue", "text": "a blue square", "metadata": {"colour": "blue", "kind": "text"}},
        {
            "id": "i-red",
            "image": b64(make_png(64, 64, (220, 0, 0))),
            "metadata": {"colour": "red", "kind": "image"},
        },
        {
            "id": "i-mix",
            "content": [{"type": "text", "text": "see"}, {"type": "image", "image": b64(make_png(40, 64))}],
            "metadata": {"colour": None, "kind": "image"},
        },
        {"id": "t-instr", "text": "green", "instruction": "Represent the colour:", "metadata": {"n": 3}},
    ]
    with srv.client() as c:
        r = c.post("/collections/e2e/documents", json={"documents": docs})
        assert r.status_code == 200, r.text
        assert r.json()["ids"] == [d["id"] for d in docs] and r.json()["count"] == 5
        info = c.get("/collections/e2e").json()
        assert info == {
            "name": "e2e",
            "count": 5,
            "dim": 64,
            "index": "flat",
            "created_at": info["created_at"],
            "store_source": True,
            "thumbnail_size": 256,
            "thumbnail_format": "webp",
            "indexes": {},  # no payload index declared
            "indexing": [],
        }
        # Sources: the text parts (joined by newlines, the instruction left out), one thumbnail per image.
        kept = {d["id"]: c.get(f"/collections/e2e/documents/{d['id']}").json() for d in docs}
        assert {i: (doc["text"], doc["thumbnails"]) for i, doc in kept.items()} == {
            "t-red": ("a red circle", 0),
            "t-blue": ("a blue square", 0),
            "i-red": (None, 1),
            "i-mix": ("see", 1),
            "t-instr": ("green", 0),
        }

        emb = load_embedder(tiny_checkpoint, device="cpu")
        stored = emb.embed([{k: v for k, v in d.items() if k not in ("id", "metadata")} for d in docs])
        query = emb.embed([{"text": "a red thing"}])[0]
        expected = sorted(zip((stored @ query).tolist(), [d["id"] for d in docs], strict=True), reverse=True)

        hits = c.post(
            "/search", json={"collection": "e2e", "query": {"text": "a red thing"}, "k": 10}
        ).json()["hits"]
        assert [h["id"] for h in hits] == [i for _, i in expected]
        np.testing.assert_allclose([h["score"] for h in hits], [s for s, _ in expected], atol=1e-4)
        assert hits[0]["metadata"] is not None

        # Raw-vector query gives the same ranking.
        hv = c.post(
            "/search", json={"collection": "e2e", "query": {"vector": query.tolist()}, "k": 3}
        ).json()["hits"]
        assert [h["id"] for h in hv] == [i for _, i in expected[:3]]

        # Filters: equality and any-of; never a filtered-out document.
        red = c.post(
            "/search",
            json={"collection": "e2e", "query": {"vector": query.tolist()}, "filter": {"colour": "red"}},
        ).json()["hits"]
        assert {h["id"] for h in red} == {"t-red", "i-red"}
        anyof = c.post(
            "/search",
            json={
                "collection": "e2e",
                "query": {"vector": query.tolist()},
                "filter": {"colour": ["blue", None]},
            },
        ).json()["hits"]
        assert {h["id"] for h in anyof} == {"t-blue", "i-mix"}
        num = c.post(
            "/search", json={"collection": "e2e", "query": {"vector": query.tolist()}, "filter": {"n": 3}}
        ).json()["hits"]
        assert [h["id"] for h in num] == ["t-instr"]


def test_replace_get_delete_and_counts(srv):
    rng = np.random.default_rng(1)
    v = _unit(rng, 3, 8)
    with srv.client() as c:
        docs = [{"id": f"d{i}", "vector": v[i].tolist(), "metadata": {"i": i}} for i in range(3)]
        assert c.post("/collections/vec/documents", json={"documents": docs}).status_code == 200
        got = c.get("/collections/vec/documents/d1", params={"with_vector": True}).json()
        np.testing.assert_allclose(got["vector"], v[1], atol=1e-6)
        assert got["metadata"] == {"i": 1}
        created = got["created_at"]
        # Replace d1 with d0's direction: searching d0 now finds both at score 1.
        r = c.post(
            "/collections/vec/documents",
            json={"documents": [{"id": "d1", "vector": (3 * v[0]).tolist(), "metadata": {"i": "new"}}]},
        )
        assert r.status_code == 200 and r.json()["count"] == 3
        after = c.get("/collections/vec/documents/d1").json()
        assert (
            after["metadata"] == {"i": "new"}
            and after["created_at"] == created
            and after["updated_at"] >= created
        )
        hits = c.post(
            "/search", json={"collection": "vec", "query": {"vector": v[0].tolist()}, "k": 2}
        ).json()["hits"]
        assert {h["id"] for h in hits} == {"d0", "d1"} and all(
            math.isclose(h["score"], 1.0, abs_tol=1e-5) for h in hits
        )
        # Delete: gone from get and from search at once.
        assert c.delete("/collections/vec/documents/d0").json() == {"deleted": "d0"}
        assert c.get("/collections/vec/documents/d0").status_code == 404
        hits = c.post(
            "/search", json={"collection": "vec", "query": {"vector": v[0].tolist()}, "k": 10}
        ).json()["hits"]
        assert [h["id"] for h in hits][0] == "d1" and "d0" not in {h["id"] for h in hits}
        assert len(hits) == 2  # never more than the collection holds
        assert c.post("/collections/vec/existing", json={"ids": ["d0", "d1", "d2", "x"]}).json() == {
            "existing": ["d1", "d2"]
        }
        names = [x["name"] for x in c.get("/collections").json()["collections"]]
        assert "vec" in names
        assert c.delete("/collections/vec").json() == {"deleted": "vec"}
        assert c.get("/collections/vec").status_code == 404


def test_explicit_hnsw_collection(srv):
    rng = np.random.default_rng(2)
    v = _unit(rng, 200, 16)
    with srv.client() as c:
        r = c.put("/collections/approx", json={"dim": 16, "index": "hnsw", "options": {"m": 16}})
        assert r.status_code == 200 and r.json()["index"] == "hnsw"
        assert c.put("/collections/approx", json={"dim": 16, "index": "flat"}).status_code == 409
        for start in range(0, 200, 50):
            docs = [{"id": str(i), "vector": v[i].tolist()} for i in range(start, start + 50)]
            assert c.post("/collections/approx/documents", json={"documents": docs}).status_code == 200
        hits = c.post(
            "/search", json={"collection": "approx", "query": {"vector": v[7].tolist()}, "k": 5}
        ).json()["hits"]
        assert hits[0]["id"] == "7"


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        (
            "post",
            "/collections/bad/documents",
            {"documents": [{"id": "a", "vector": [1.0, 0.0]}, {"id": "a", "vector": [0.0, 1.0]}]},
            422,
        ),
        ("post", "/collections/bad/documents", {"documents": [{"id": "a", "vector": [0.0, 0.0]}]}, 422),
        (
            "post",
            "/collections/bad/documents",
            {"documents": [{"id": "a", "vector": [1.0, 0.0]}, {"id": "b", "vector": [1.0, 0.0, 0.0]}]},
            422,
        ),
        ("post", "/collections/bad/documents", {"documents": [{"id": "a"}]}, 422),
        (
            "post",
            "/collections/bad/documents",
            {"documents": [{"id": "a", "vector": [1.0], "text": "x"}]},
            422,
        ),
        ("post", "/collections/bad/documents", {"documents": [{"id": "", "vector": [1.0]}]}, 422),
        ("post", "/collections/bad/documents", {"documents": []}, 422),
        (
            "post",
            "/collections/bad/documents",
            {"documents": [{"id": "a", "vector": [1.0], "metadata": [1]}]},
            422,
        ),
        # An encoded slash never reaches a collection name: no route matches.
        ("post", "/collections/..%2Fescape/documents", {"documents": [{"id": "a", "vector": [1.0]}]}, 404),
        ("post", "/collections/../documents", {"documents": [{"id": "a", "vector": [1.0]}]}, 404),
        ("post", "/collections/.hidden/documents", {"documents": [{"id": "a", "vector": [1.0]}]}, 422),
        ("post", "/collections/a%20b/documents", {"documents": [{"id": "a", "vector": [1.0]}]}, 422),
        ("get", "/collections/nope", None, 404),
        ("get", "/collections/nope/documents/x", None, 404),
        ("delete", "/collections/nope", None, 404),
        ("post", "/search", {"collection": "nope", "query": {"vector": [1.0, 0.0]}}, 404),
        ("post", "/search", {"collection": "nope", "query": {"text": "x"}}, 404),
        ("post", "/search", {"query": {"vector": [1.0]}, "k": 0}, 422),
        ("post", "/search", {"query": {"vector": [1.0]}, "filter": {"a": {"b": 1}}}, 422),
        ("post", "/search", {"query": {"vector": [1.0]}, "filter": "colour=red"}, 422),
        ("post", "/search", {"query": {}}, 422),
        ("post", "/search", {"query": {"vector": [1.0]}, "unknown": 1}, 422),
    ],
)
def test_bad_requests(srv, method, path, body, status):
    with srv.client() as c:
        r = c.request(method, path, json=body) if body is not None else c.request(method, path)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["type"] and err["message"]
        assert "Traceback" not in r.text and "/work/" not in r.text


def test_dimension_mismatch_and_nan_vectors(srv):
    with srv.client() as c:
        assert (
            c.post(
                "/collections/dims/documents", json={"documents": [{"id": "a", "vector": [1.0, 0.0, 0.0]}]}
            ).status_code
            == 200
        )
        r = c.post("/collections/dims/documents", json={"documents": [{"id": "b", "vector": [1.0, 0.0]}]})
        assert r.status_code == 422 and "3-d" in r.json()["error"]["message"]
        r = c.post("/search", json={"collection": "dims", "query": {"vector": [1.0, 0.0]}})
        assert r.status_code == 422
        raw = '{"documents": [{"id": "n", "vector": [NaN, 1.0, 0.0]}]}'
        r = c.post("/collections/dims/documents", content=raw, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422)
        r = c.post(
            "/collections/dims/documents", json={"documents": [{"id": "big", "vector": [1e39, 1.0, 0.0]}]}
        )
        assert r.status_code == 422
        # A model-embedded document has the model's dimension (64), not 3: refused, nothing stored.
        r = c.post("/collections/dims/documents", json={"documents": [{"id": "t", "text": "hello"}]})
        assert r.status_code == 422
        assert c.get("/collections/dims").json()["count"] == 1


def test_batch_upsert_is_all_or_nothing(srv):
    with srv.client() as c:
        good = {"id": "ok", "vector": [1.0, 0.0]}
        bad = {"id": "bad", "vector": [float("inf"), 0.0]}
        assert c.post("/collections/atomic/documents", json={"documents": [good]}).status_code == 200
        r = c.post(
            "/collections/atomic/documents",
            content=(
                '{"documents": [{"id": "ok2", "vector": [0.0, 1.0]}, {"id": "bad", "vector": [Infinity, 0.0]}]}'
            ),
            headers={"content-type": "application/json"},
        )
        assert r.status_code in (400, 422)
        assert c.get("/collections/atomic/documents/ok2").status_code == 404
        assert c.get("/collections/atomic").json()["count"] == 1
        del bad


def test_concurrent_upserts_and_searches(srv):
    rng = np.random.default_rng(3)
    v = _unit(rng, 400, 16)

    def upsert(i):
        with srv.client() as c:
            docs = [{"id": f"{i}-{j}", "vector": v[(i * 20 + j) % 400].tolist()} for j in range(20)]
            return c.post("/collections/conc/documents", json={"documents": docs}).status_code

    def search(i):
        with srv.client() as c:
            r = c.post("/search", json={"collection": "conc", "query": {"vector": v[i].tolist()}, "k": 5})
            return r.status_code

    with srv.client() as c:
        c.post("/collections/conc/documents", json={"documents": [{"id": "seed", "vector": v[0].tolist()}]})
    with cf.ThreadPoolExecutor(16) as pool:
        ups = [pool.submit(upsert, i) for i in range(20)]
        finds = [pool.submit(search, i) for i in range(60)]
        assert all(f.result() == 200 for f in ups)
        assert all(f.result() == 200 for f in finds)
    with srv.client() as c:
        assert c.get("/collections/conc").json()["count"] == 401


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_persistence_across_restart(tiny_checkpoint, tmp_path, backend, request):
    env = {}
    if backend == "postgres":
        env["LLAVE_STORE_URL"] = request.getfixturevalue("postgres_url")
    rng = np.random.default_rng(4)
    v = _unit(rng, 30, 8)
    server = start_server(tiny_checkpoint, tmp_path, env=env)
    try:
        with server.client() as c:
            docs = [{"id": f"p{i}", "vector": v[i].tolist(), "metadata": {"i": i}} for i in range(30)]
            assert c.post("/collections/keep/documents", json={"documents": docs}).status_code == 200
            before = c.post(
                "/search", json={"collection": "keep", "query": {"vector": v[3].tolist()}, "k": 5}
            ).json()
    finally:
        server.stop()
    server = start_server(tiny_checkpoint, tmp_path, env=env)
    try:
        with server.client() as c:
            assert c.get("/collections/keep").json()["count"] == 30
            after = c.post(
                "/search", json={"collection": "keep", "query": {"vector": v[3].tolist()}, "k": 5}
            ).json()
            assert after == before
    finally:
        server.stop()


def test_paging_through_documents(srv):
    rng = np.random.default_rng(5)
    v = _unit(rng, 25, 4)
    ids = [f"pg-{i:02d}" for i in range(25)] + ["Zebra", "ä-umlaut"]
    with srv.client() as c:
        docs = [{"id": d, "vector": v[i % 25].tolist(), "metadata": {"i": i}} for i, d in enumerate(ids)]
        assert c.post("/collections/paged/documents", json={"documents": docs}).status_code == 200
        seen, cursor = [], None
        while True:
            params = {"limit": 10, "with_vector": "true", **({"cursor": cursor} if cursor else {})}
            r = c.get("/collections/paged/documents", params=params)
            assert r.status_code == 200, r.text
            page = r.json()
            assert len(page["documents"]) <= 10 and all(len(d["vector"]) == 4 for d in page["documents"])
            seen += [d["id"] for d in page["documents"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted(ids, key=lambda s: s.encode())  # bytewise id order, on both backends
        assert c.get("/collections/paged/documents", params={"limit": 0}).status_code == 422
        assert c.get("/collections/nope/documents").status_code == 404


def test_range_and_not_filters_over_http(srv):
    rng = np.random.default_rng(6)
    v = _unit(rng, 30, 4)
    with srv.client() as c:
        docs = [
            {"id": f"r{i}", "vector": v[i].tolist(), "metadata": {"price": i, "tag": ["a", "b"][i % 2]}}
            for i in range(30)
        ]
        assert c.post("/collections/ranged/documents", json={"documents": docs}).status_code == 200
        query = {"collection": "ranged", "query": {"vector": v[0].tolist()}, "k": 30}
        f = {"price": {"gte": 10, "lt": 20}, "tag": {"not": "a"}}
        r = c.post("/search", json={**query, "filter": f})
        assert r.status_code == 200, r.text
        assert sorted(int(h["id"][1:]) for h in r.json()["hits"]) == [11, 13, 15, 17, 19]
        for bad in ({"price": {"between": [1, 2]}}, {"price": {"gte": "1"}}, {"price": {}}):
            assert c.post("/search", json={**query, "filter": bad}).status_code == 422
        assert r.json()["scanned_keys"] == ["price", "tag"]  # no payload index yet
        r = c.put("/collections/ranged", json={"indexes": {"price": "float", "when": "datetime"}})
        assert r.status_code == 200, r.text
        assert r.json()["indexes"] == {"price": "float", "when": "datetime"}
        for _ in range(200):  # built in the background
            info = c.get("/collections/ranged").json()
            if not info["indexing"]:
                break
        assert info["indexing"] == [] and info["indexes"] == {"price": "float", "when": "datetime"}
        r = c.post("/search", json={**query, "filter": f})
        assert sorted(int(h["id"][1:]) for h in r.json()["hits"]) == [11, 13, 15, 17, 19]
        assert r.json()["scanned_keys"] == ["tag"]
        r = c.post("/search", json={**query, "filter": {"when": {"gte": "2026-01-01T00:00:00Z"}}})
        assert r.status_code == 200 and r.json() == {"hits": [], "collection": "ranged", "scanned_keys": []}
        for bad in ({"price": "vector"}, {"": "float"}, "price"):
            r = c.put("/collections/ranged", json={"indexes": bad})
            assert r.status_code == 422 and r.json()["error"]["type"], r.text


# --- sources: text and thumbnails kept with the documents ------------------------------------------


def _data_uri_bytes(uri: str, media_type: str) -> bytes:
    prefix = f"data:{media_type};base64,"
    assert uri.startswith(prefix), uri[:40]
    return base64.b64decode(uri[len(prefix) :])


def test_sources_over_http_thumbnail_route_and_search_include(srv):
    wide, tall = image_with_corner(300, 120), image_with_corner(50, 80, (230, 200, 20))
    docs = [
        {"id": "dir/wide.png", "image": b64(wide), "text": "a wide one", "metadata": {"n": 1}},
        {"id": "both", "content": [{"type": "image", "image": b64(tall)}, {"type": "text", "text": "x"},
                                   {"type": "image", "image": b64(wide)}]},
        {"id": "plain", "text": "no image"},
    ]  # fmt: skip
    with srv.client() as c:
        assert c.post("/collections/src/documents", json={"documents": docs}).status_code == 200
        both = c.get("/collections/src/documents/both").json()
        assert (both["text"], both["thumbnails"]) == ("x", 2)

        # The thumbnail route: bytes decoded with Pillow against the original images.
        r = c.get("/collections/src/documents/dir/wide.png/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
        assert_thumbnail_of(r.content, wide, 256)  # 300 px wide: scaled down to 256
        assert r.headers["cache-control"].startswith("private") and r.headers["etag"]
        assert_thumbnail_of(
            c.get("/collections/src/documents/both/thumbnail").content, tall, 256
        )  # not enlarged
        second = c.get("/collections/src/documents/both/thumbnail", params={"index": 1})
        assert_thumbnail_of(second.content, wide, 256)
        # Revalidation: 304 with no body while unchanged; a replaced document has a new ETag.
        etag = r.headers["etag"]
        again = c.get("/collections/src/documents/dir/wide.png/thumbnail", headers={"if-none-match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        assert (
            c.get(
                "/collections/src/documents/dir/wide.png/thumbnail", headers={"if-none-match": '"other"'}
            ).status_code
            == 200
        )
        replaced = {"id": "dir/wide.png", "image": b64(tall)}
        assert c.post("/collections/src/documents", json={"documents": [replaced]}).status_code == 200
        new = c.get("/collections/src/documents/dir/wide.png/thumbnail", headers={"if-none-match": etag})
        assert new.status_code == 200 and new.headers["etag"] != etag
        assert_thumbnail_of(new.content, tall, 256)
        assert (
            c.get("/collections/src/documents/dir/wide.png").json()["text"] is None
        )  # replaced, with its source

        # 404 (JSON error) for a missing thumbnail, document or collection; 422 for a bad index.
        for path, params in [
            ("/collections/src/documents/plain/thumbnail", {}),
            ("/collections/src/documents/both/thumbnail", {"index": 2}),
            ("/collections/src/documents/nope/thumbnail", {}),
            ("/collections/nope/documents/both/thumbnail", {}),
        ]:
            r = c.get(path, params=params)
            assert r.status_code == 404, (path, r.text)
            assert r.json()["error"]["type"] == "not_found" and r.json()["error"]["message"]
        for index in (-1, 10**6, "x"):
            r = c.get("/collections/src/documents/both/thumbnail", params={"index": index})
            assert r.status_code == 422 and r.json()["error"]["message"]

        # An id may not look like the thumbnail route: refused, so every path names one thing.
        bad = c.post("/collections/src/documents", json={"documents": [{"id": "x/thumbnail", "text": "t"}]})
        assert bad.status_code == 422 and "/thumbnail" in bad.json()["error"]["message"]
        assert c.get("/collections/src/documents/x/thumbnail").status_code == 404  # no document "x"
        assert c.delete("/collections/src/documents/both/thumbnail").status_code == 405

        # /search include: text and the first image's thumbnail as a data: URI, null where none.
        query = {"collection": "src", "query": {"text": "x"}, "k": 10}
        plain_hits = c.post("/search", json=query).json()["hits"]
        assert all(set(h) == {"id", "score", "metadata"} for h in plain_hits)
        hits = {
            h["id"]: h
            for h in c.post("/search", json={**query, "include": ["text", "thumbnail"]}).json()["hits"]
        }
        assert set(hits) == {"dir/wide.png", "both", "plain"}
        assert hits["plain"]["text"] == "no image" and hits["plain"]["thumbnail"] is None
        assert_thumbnail_of(_data_uri_bytes(hits["both"]["thumbnail"], "image/webp"), tall, 256)
        only_text = c.post("/search", json={**query, "include": ["text"]}).json()["hits"]
        assert all("thumbnail" not in h and "text" in h for h in only_text)
        assert c.post("/search", json={**query, "include": ["vector"]}).status_code == 422


def test_source_options_store_source_false_and_jpeg(srv):
    red = make_png(64, 64, (220, 0, 0))
    turned = rotated_jpeg(200, 100)
    with srv.client() as c:
        r = c.put("/collections/nosrc", json={"store_source": False})
        assert r.status_code == 200 and r.json()["store_source"] is False and r.json()["dim"] == 64
        doc = {"id": "a", "image": b64(red), "text": "red"}
        assert c.post("/collections/nosrc/documents", json={"documents": [doc]}).status_code == 200
        got = c.get("/collections/nosrc/documents/a").json()
        assert (got["text"], got["thumbnails"]) == (None, 0)
        hit = c.post(
            "/search",
            json={"collection": "nosrc", "query": {"text": "red"}, "include": ["text", "thumbnail"]},
        ).json()["hits"][0]
        assert (hit["text"], hit["thumbnail"]) == (None, None)
        assert c.get("/collections/nosrc/documents/a/thumbnail").status_code == 404

        # Source options change on an existing collection (its dimension is kept); index options do not.
        r = c.put(
            "/collections/nosrc",
            json={"store_source": True, "thumbnail_size": 64, "thumbnail_format": "jpeg"},
        )
        assert r.status_code == 200, r.text
        assert {k: r.json()[k] for k in ("store_source", "thumbnail_size", "thumbnail_format", "count")} == {
            "store_source": True, "thumbnail_size": 64, "thumbnail_format": "jpeg", "count": 1
        }  # fmt: skip
        assert c.get("/collections/nosrc").json()["thumbnail_format"] == "jpeg"
        assert c.put("/collections/nosrc", json={"index": "hnsw"}).status_code == 409
        assert (
            c.post(
                "/collections/nosrc/documents", json={"documents": [{"id": "t", "image": b64(turned)}]}
            ).status_code
            == 200
        )
        r = c.get("/collections/nosrc/documents/t/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        upright = assert_thumbnail_of(r.content, turned, 64, fmt="JPEG")
        assert upright.height > upright.width  # EXIF orientation applied
        for bad in ({"thumbnail_size": 8}, {"thumbnail_size": 100000}, {"thumbnail_format": "png"},
                    {"store_source": "yes"}):  # fmt: skip
            r = c.put("/collections/nosrc", json=bad)
            assert r.status_code == 422 and r.json()["error"]["message"], bad
        assert c.get("/collections/nosrc").json()["thumbnail_size"] == 64


def test_thumbnail_route_needs_the_api_key(guarded_server):
    with guarded_server.client(headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        doc = {"id": "k", "image": b64(make_png(32, 32))}
        assert c.post("/collections/guarded/documents", json={"documents": [doc]}).status_code == 200
        assert c.get("/collections/guarded/documents/k/thumbnail").status_code == 200
    with guarded_server.client() as c:
        r = c.get("/collections/guarded/documents/k/thumbnail")
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"


def test_keyword_and_hybrid_modes_over_http(srv):
    codes = ["QX-4821", "BT-1290", "LM-7733", "ZR-5150"]
    docs = [
        {"id": c, "text": f"hex bolt, part number {c}", "metadata": {"n": i}} for i, c in enumerate(codes)
    ]
    with srv.client() as c:
        assert c.post("/collections/modes/documents", json={"documents": docs}).status_code == 200
        base = {"collection": "modes", "k": 4, "include": ["text"]}
        r = c.post("/search", json={**base, "query": {"text": "LM-7733", "mode": "keyword"}})
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["hits"]] == ["LM-7733"] and "LM-7733" in r.json()["hits"][0]["text"]
        query = {"text": "LM-7733", "mode": "hybrid", "weights": {"vector": 1, "keyword": 2}}
        r = c.post("/search", json={**base, "query": query, "filter": {"n": {"gte": 1}}})
        hits = r.json()["hits"]
        assert r.status_code == 200 and hits[0]["id"] == "LM-7733" and len(hits) == 3, r.text
        assert hits[0]["keyword_score"] > 0 and -1 <= hits[0]["vector_score"] <= 1
        vector = c.post("/search", json={**base, "query": {"text": "LM-7733"}, "filter": {"n": {"gte": 1}}})
        rank = [h["id"] for h in vector.json()["hits"]].index("LM-7733") + 1
        assert hits[0]["score"] == pytest.approx(2 / 61 + 1 / (60 + rank))
        for bad in ({"mode": "keyword"}, {"text": " ", "mode": "hybrid"}, {"text": "x", "mode": "fuzzy"},
                    {"text": "x", "mode": "hybrid", "weights": {"vector": -1}}):  # fmt: skip
            r = c.post("/search", json={**base, "query": bad})
            assert r.status_code == 422 and r.json()["error"]["type"], r.text
