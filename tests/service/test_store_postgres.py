"""What only the PostgreSQL + pgvector backend has: halfvec indexes, filtered top-k that
still returns k hits, the indexes the planner uses, several store processes on one database,
and crash safety when the writers or PostgreSQL itself are killed with SIGKILL.

The contract shared with the SQLite store is tested on both backends in test_store.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest

from service.storage.errors import (
    CollectionNotFoundError,
    InvalidMetadataError,
    InvalidParameterError,
    StoreUnavailableError,
)
from service.storage.postgres import PostgresCollectionStore
from tests.service.test_store import assert_exact, ids_for, random_data, unit
from tests.service.test_store_crash import parse

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pg(postgres_url):
    with PostgresCollectionStore(postgres_url) as store:
        yield store


def _plan(url: str, sql: str, params=()) -> str:
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        return "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql, params).fetchall())


def test_high_dimension_uses_halfvec_index_and_exact_scores(pg, postgres_url):
    dim = 2304  # over pgvector's 2,000-dimension vector index limit (LLaVE-7B: 3,584)
    x = random_data(300, dim, 0)
    ids = ids_for(len(x))
    pg.create_collection("big", dim, "hnsw", {"m": 8, "ef_construction": 32})
    pg.upsert("big", ids, x, [{"i": i % 3} for i in range(len(x))])
    for q in x[:5]:
        hits = pg.search("big", q, 10)
        assert hits[0]["id"] == ids[int(np.argmax(unit(x) @ unit(q[None])[0]))]
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)  # the stored vector is full precision
        true = unit(x) @ unit(q[None])[0]
        for h in hits:
            assert abs(true[ids.index(h["id"])] - h["score"]) < 1e-5
    with psycopg.connect(postgres_url) as conn:
        (indexdef,) = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname LIKE '%%_ann'").fetchone()
    assert "halfvec(2304)" in indexdef and "halfvec_ip_ops" in indexdef
    np.testing.assert_allclose(pg.get("big", "doc-3", with_vector=True)["vector"], unit(x[3:4])[0], atol=1e-7)
    # halfvec on request below the limit; and dimensions no pgvector index can take are refused
    pg.create_collection("half", 64, "hnsw", {"precision": "halfvec"})
    with psycopg.connect(postgres_url) as conn:
        defs = [r[0] for r in conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname LIKE '%%_ann'")]
    assert sum("halfvec(64)" in d for d in defs) == 1
    with pytest.raises(InvalidParameterError):
        pg.create_collection("sq8", 64, "hnsw", {"precision": "sq8"})  # the embedded store's
    with pytest.raises(InvalidParameterError):
        pg.create_collection("huge", 4096, "hnsw")
    with pytest.raises(InvalidParameterError):
        pg.create_collection("bad", 8, "hnsw", {"m": 200})
    pg.create_collection("wide-flat", 4096, "flat")  # exact scan has no such limit


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_halfvec_candidates_are_rescored_exactly(pg, kind):
    """Cosines 1.5e-5 apart just below 1, where 16-bit floats are 4.9e-4 apart: the halfvec
    index sees ties and picks candidates; the full-precision column must decide the top k."""
    dim = 32
    rng = np.random.default_rng(7)
    qs = np.eye(dim)[:3]
    x, ids = [], []
    for j, q in enumerate(qs):
        c = np.concatenate([1 - 1.5e-5 * rng.permutation(30), rng.uniform(0.5, 0.95, 70)])
        w = rng.standard_normal((len(c), dim))
        w[:, j] = 0
        w = unit(w)
        x.append(c[:, None] * q + np.sqrt(1 - c**2)[:, None] * w)
        ids += [f"q{j}-{i}" for i in range(len(c))]
    x = np.concatenate(x).astype(np.float32)
    options = {"precision": "halfvec"}
    options |= {"m": 16, "ef_construction": 64} if kind == "hnsw" else {"min_train": 100, "nprobe": 32}
    pg.create_collection("h", dim, kind, options)
    pg.upsert("h", ids, x)
    for q in qs:
        assert_exact(pg.search("h", q, 10), ids, x, q, 10)


def test_selective_filter_still_returns_k_hits(pg):
    """A filter matching 0.5% of an HNSW collection: iterative scans, then the exact fallback."""
    x = random_data(4000, 16, 3, clustered=True)
    ids = ids_for(len(x))
    meta = [{"rare": i % 200 == 0, "grp": i % 7} for i in range(len(x))]
    pg.create_collection("c", 16, "hnsw", {"m": 8, "ef_search": 10, "ef_construction": 32})
    for start in range(0, len(x), 1000):
        pg.upsert("c", ids[start : start + 1000], x[start : start + 1000], meta[start : start + 1000])
    allowed = np.array([m["rare"] for m in meta])
    for q in random_data(10, 16, 4):
        hits = pg.search("c", q, 15, {"rare": True})
        assert_exact(hits, ids, x, q, 15, allowed)  # 20 match: 15 hits, the best ones
        hits = pg.search("c", q, 10, {"grp": [2, 5]})
        assert len(hits) == 10 and all(h["metadata"]["grp"] in (2, 5) for h in hits)


def test_filters_use_the_gin_index_and_ann_uses_hnsw(pg, postgres_url):
    pg.create_collection("c", 8, "hnsw", {"m": 8, "ef_construction": 32})
    pg.upsert("c", ids_for(500), random_data(500, 8, 0), [{"k": i % 50} for i in range(500)])
    with psycopg.connect(postgres_url) as conn:
        (serial,) = conn.execute("SELECT serial FROM llave_collections WHERE name = 'c'").fetchone()
    table = f"llave_docs_{serial}"
    plan = _plan(postgres_url, f"SELECT id FROM {table} WHERE metadata @> %s::jsonb", ('{"k": 3}',))
    assert f"{table}_meta" in plan, plan
    plan = _plan(
        postgres_url, f"SELECT id FROM {table} ORDER BY embedding <#> %s::vector LIMIT 5", (str([1.0] * 8),)
    )
    assert f"{table}_ann" in plan, plan


def test_filter_does_not_look_inside_arrays_and_nul_is_refused(pg):
    pg.upsert("c", ["arr", "one", "obj"], np.eye(3), [{"v": [1, 2]}, {"v": 1}, {"v": {"w": 1}}])
    assert {h["id"] for h in pg.search("c", np.ones(3), 10, {"v": 1})} == {"one"}
    assert pg.search("c", np.ones(3), 10, {"v": "a\x00b"}) == []
    with pytest.raises(InvalidMetadataError):
        pg.upsert("c", ["nul"], np.ones((1, 3)), [{"s": "a\x00b"}])


def test_integrity_check_notices_tampering(pg, postgres_url):
    pg.upsert("c", ids_for(10), random_data(10, 4, 0))
    assert pg.integrity_check() == []
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        (serial,) = conn.execute("SELECT serial FROM llave_collections WHERE name = 'c'").fetchone()
        conn.execute(f"DELETE FROM llave_docs_{serial} WHERE id = 'doc-3'")
    assert any("9 documents stored, count says 10" in p for p in pg.integrity_check())


def test_two_stores_one_database(postgres_url):
    """Two store instances (as in two server processes): a write acknowledged by one is seen by
    the other at once; concurrent upserts of the same ids end in one consistent state."""
    dim = 8
    with PostgresCollectionStore(postgres_url) as a, PostgresCollectionStore(postgres_url) as b:
        a.upsert("c", ["x"], np.ones((1, dim)), [{"by": "a"}])
        assert b.get("c", "x")["metadata"] == {"by": "a"}
        assert b.search("c", np.ones(dim), 1)[0]["id"] == "x"
        ids = ids_for(50)
        errors: list[BaseException] = []

        def write(store, who: str, seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                for round_ in range(20):
                    order = list(ids) if seed % 2 else list(reversed(ids))
                    store.upsert(
                        "c",
                        order,
                        rng.standard_normal((len(ids), dim)),
                        [{"by": who, "r": round_}] * len(ids),
                    )
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [
            threading.Thread(target=write, args=(s, w, i))
            for i, (s, w) in enumerate([(a, "a"), (b, "b")] * 2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert a.describe("c")["count"] == b.describe("c")["count"] == 51
        # every batch is one transaction: the survivors all come from one writer's one round
        last = {
            (d["metadata"]["by"], d["metadata"]["r"])
            for d in a.list_documents("c", None, 100)[0]
            if d["id"] != "x"
        }
        assert len(last) == 1, last
        assert a.integrity_check() == []
        b.delete_collection("c")
        with pytest.raises(CollectionNotFoundError):
            a.describe("c")
        a.upsert("c", ["y"], np.ones((1, 3)))  # recreated with another dimension, seen by b
        assert b.describe("c")["dim"] == 3


CHILD = r"""
import sys
import numpy as np
from service.storage.postgres import PostgresCollectionStore
from service.storage.errors import StoreUnavailableError

url, rnd, writer, batch_size, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(rnd * 10 + writer)
store = PostgresCollectionStore(url)
store.open()
print("OPEN", flush=True)
b = 0
try:
    while True:
        name = f"r{rnd}w{writer}-b{b}"
        ids = [f"{name}-{j}" for j in range(batch_size)]
        store.upsert("crash", ids, rng.standard_normal((batch_size, dim)), [{"b": b}] * batch_size)
        print(f"ACK {name}", flush=True)
        if b % 3 == 2:
            store.upsert("crash", ids, rng.standard_normal((batch_size, dim)), [{"b": b, "v": 2}] * batch_size)
            print(f"REP {name}", flush=True)
        if b % 4 == 3:
            victim = f"r{rnd}w{writer}-b{b - 1}-0"
            print(f"WILL-DEL {victim}", flush=True)
            store.delete("crash", victim)
            print(f"DEL {victim}", flush=True)
        b += 1
except StoreUnavailableError as exc:
    print(f"UNAVAILABLE {exc}".replace("\n", " "), flush=True)
"""
BATCH, DIM, WRITERS = 12, 16, 2


def _start_writers(url: str, rnd: int, tmp: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = []
    for w in range(WRITERS):
        with open(tmp / f"writer-{rnd}-{w}.err", "w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", CHILD, url, str(rnd), str(w), str(BATCH), str(DIM)],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    cwd=ROOT,
                    env=env,
                )  # fmt: skip
            )
    return procs


def _collect(procs: list[subprocess.Popen], acks_wanted: int, kill) -> list[str]:
    lines: list[list[str]] = [[] for _ in procs]
    reader_threads = []

    def read(i: int) -> None:
        for line in procs[i].stdout:  # only whole lines count
            if line.endswith("\n"):
                lines[i].append(line.strip())

    for i in range(len(procs)):
        reader_threads.append(threading.Thread(target=read, args=(i,), daemon=True))
        reader_threads[-1].start()
    deadline = time.monotonic() + 120
    while sum(line.startswith("ACK") for chunk in lines for line in chunk) < acks_wanted:
        assert time.monotonic() < deadline, lines
        assert all(p.poll() is None for p in procs), f"a writer died on its own: {lines}"
        time.sleep(0.005)
    kill()
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for t in reader_threads:
        t.join(timeout=30)
    return [line for chunk in lines for line in chunk]


def _check(url: str, rounds: range, acked, replaced, deleted, unconfirmed) -> None:
    with PostgresCollectionStore(url) as store:
        assert store.integrity_check() == []
        count = store.describe("crash")["count"]
        stored: set[str] = set()
        for batch in {f"r{r}w{w}-b{b}" for r in rounds for w in range(WRITERS) for b in range(300)}:
            ids = [f"{batch}-{j}" for j in range(BATCH)]
            present = store.existing_ids("crash", ids)
            stored |= present
            gone = {d for d in ids if d in deleted}
            maybe = {d for d in ids if d in unconfirmed}
            if batch in acked:
                assert set(ids) - present - maybe == gone, f"acknowledged batch {batch} damaged"
            elif present:
                assert set(ids) - present - maybe == set(), f"partial batch {batch}"
            versions = {store.get("crash", d)["metadata"].get("v") for d in present}
            assert len(versions) <= 1, f"batch {batch} partly replaced"
            if batch in replaced and present:
                assert versions == {2}, f"acknowledged replacement of {batch} lost"
        assert count == len(stored)
        docs = sorted(stored)
        vectors = np.stack([store.get("crash", d, with_vector=True)["vector"] for d in docs])
        for doc, hits in zip(docs, store.search_many("crash", vectors, 1), strict=True):
            assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5) and hits[0]["id"] == doc


@pytest.mark.parametrize("victim", ["writers", "postgres"])
def test_kill_9_loses_nothing_acknowledged(postgres_server, tmp_path, victim):
    """SIGKILL the writing processes (the servers), or PostgreSQL itself, during concurrent upserts."""
    url = postgres_server.new_database(f"crash_{victim}")
    rng = random.Random(99)
    acked: set[str] = set()
    replaced: set[str] = set()
    deleted: set[str] = set()
    unconfirmed: set[str] = set()
    with PostgresCollectionStore(url) as store:
        store.create_collection("crash", DIM, "hnsw", {"m": 8, "ef_construction": 32})
    for rnd in range(3):
        procs = _start_writers(url, rnd, tmp_path)

        def kill(procs: list[subprocess.Popen] = procs) -> None:
            time.sleep(rng.uniform(0, 0.03))
            if victim == "writers":
                for p in procs:
                    p.send_signal(signal.SIGKILL)
            else:
                postgres_server.kill()

        lines = _collect(procs, rng.randint(4, 30), kill)
        if victim == "postgres":
            assert any(line.startswith("UNAVAILABLE") for line in lines), lines[-5:]
            postgres_server.start()
        got_acked, got_replaced, got_deleted, in_flight = parse(lines)
        assert got_acked
        acked |= got_acked
        replaced |= got_replaced
        deleted |= got_deleted
        unconfirmed |= in_flight
        _check(url, range(rnd + 1), acked, replaced, deleted, unconfirmed)


@pytest.mark.parametrize("victim", ["server", "postgres"])
def test_http_kill_9_loses_nothing_acknowledged(tiny_checkpoint, tmp_path, postgres_server, victim):
    """Over HTTP (tests/reliability/crash.py on --store-url): SIGKILL of the server during
    concurrent upserts, or of PostgreSQL under a live server that must recover once it is
    back; every acknowledged write is there, every batch whole."""
    from tests.reliability.crash import check_kill_9

    url = postgres_server.new_database(f"http_crash_{victim}")
    postgres = postgres_server if victim == "postgres" else None
    print(victim, check_kill_9(tiny_checkpoint, tmp_path, 2, seed=11, store_url=url, postgres=postgres))


def test_store_reconnects_after_postgres_restart(postgres_server):
    url = postgres_server.new_database("reconnect")
    with PostgresCollectionStore(url) as store:
        store.upsert("c", ["a"], np.ones((1, 4)))
        postgres_server.kill()
        with pytest.raises(StoreUnavailableError):
            store.search("c", np.ones(4))
        postgres_server.start()
        assert store.search("c", np.ones(4), 1)[0]["id"] == "a"  # broken connections were dropped
        store.upsert("c", ["b"], np.ones((1, 4)))
        assert store.describe("c")["count"] == 2


def test_read_only_database_serves_searches_and_refuses_writes(postgres_server):
    """As on a streaming-replication standby (here: default_transaction_read_only)."""
    url = postgres_server.new_database("read_only")
    with PostgresCollectionStore(url) as store:
        store.upsert("c", ids_for(5), random_data(5, 4, 0), [{"i": i} for i in range(5)])
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute('ALTER DATABASE "read_only" SET default_transaction_read_only = on')
    with PostgresCollectionStore(url) as store:
        assert len(store.search("c", np.ones(4), 3, {"i": [1, 2, 3]})) == 3
        assert store.describe("c")["count"] == 5
        with pytest.raises(StoreUnavailableError, match="read-only"):
            store.upsert("c", ["new"], np.ones((1, 4)))
        with pytest.raises(StoreUnavailableError):
            store.delete("c", "doc-1")
    empty = postgres_server.new_database("read_only_empty")
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute('ALTER DATABASE "read_only_empty" SET default_transaction_read_only = on')
    with pytest.raises(StoreUnavailableError, match="read-only"):
        PostgresCollectionStore(empty).open()


def test_largest_in_row_vectors_with_the_longest_ids(pg):
    from service.storage.postgres import PLAIN_MAX_DIM

    x = random_data(3, PLAIN_MAX_DIM, 0)
    ids = ["é" * 512, "x" * 512, "y"]  # 1 KB of UTF-8 and more beside the vector in one row
    pg.upsert("wide", ids, x, [{"k": "v" * 5000}, None, {"a": 1}])
    assert pg.search("wide", x[0], 1)[0]["id"] == ids[0]
    np.testing.assert_allclose(pg.get("wide", ids[0], with_vector=True)["vector"], unit(x[:1])[0], atol=1e-7)


def test_bulk_upserts_through_copy_equal_row_by_row_upserts(pg, monkeypatch):
    """A batch of COPY_MIN_ROWS or more goes through COPY and a staging table: the same rows,
    replacements, count, metadata and sources as the same documents upserted in small batches."""
    from service.storage.postgres import COPY_MIN_ROWS
    from service.storage.sources import Source, Thumbnail

    n = COPY_MIN_ROWS + 36
    x = random_data(n, 24, 1)
    ids = [f"doc-{i:04d}" for i in range(n)]
    meta = [{"i": i, "tag": "é\u2028"} if i % 3 else None for i in range(n)]
    sources = [
        Source(f"text {i}", (Thumbnail("image/webp", bytes([i % 256]) * 9),)) if i % 2 else None
        for i in range(n)
    ]
    pg.upsert("small", ids[:10], x[:10] * 3)  # replaced below
    for start in range(0, n, 16):
        pg.upsert(
            "small",
            ids[start : start + 16],
            x[start : start + 16],
            meta[start : start + 16],
            sources=sources[start : start + 16],
        )
    pg.upsert("bulk", ids[:10], x[:10] * 3)
    copies: list[str] = []
    real_copy = psycopg.Cursor.copy
    monkeypatch.setattr(
        psycopg.Cursor, "copy", lambda cur, sql, *a, **k: copies.append(sql) or real_copy(cur, sql, *a, **k)
    )
    pg.upsert("bulk", ids, x, meta, sources=sources)  # one COPY: 10 replaced, the rest new
    assert len(copies) == 1
    assert pg.describe("bulk")["count"] == pg.describe("small")["count"] == n
    page = lambda name: pg.list_documents(name, None, 1000, with_vector=True, with_source=True)[0]  # noqa: E731
    for a, b in zip(page("small"), page("bulk"), strict=True):
        assert (a["id"], a["metadata"], a["source"]) == (b["id"], b["metadata"], b["source"])
        np.testing.assert_array_equal(a["vector"], b["vector"])
    assert pg.search("bulk", x[7], 1)[0]["id"] == ids[7]


# --- read replica (--store-read-url) ---------------------------------------------------------


@pytest.fixture(scope="module")
def primary_and_standby():
    """A primary and its hot standby (streaming replication over loopback), for this module."""
    if os.environ.get("LLAVE_TEST_POSTGRES", "1") == "0":
        pytest.skip("PostgreSQL tests disabled by LLAVE_TEST_POSTGRES=0")
    from tests.postgres import PostgresServer

    primary = PostgresServer()
    standby = None
    try:
        primary.start()
        primary.new_database("rep")
        standby = PostgresServer(standby_of=primary)
        standby.start()
        yield primary, standby
    finally:
        if standby is not None:
            standby.cleanup()
        primary.cleanup()


def _db(server, name: str = "rep") -> str:
    return server.url.rsplit("/", 1)[0] + "/" + name


def _replay(standby_url: str, action: str) -> None:
    with psycopg.connect(standby_url, autocommit=True) as conn:
        conn.execute(f"SELECT pg_wal_replay_{action}()")


def test_reads_go_to_the_replica_and_writes_to_the_primary(primary_and_standby):
    primary, standby = primary_and_standby
    x = random_data(40, 8, 0)
    writer = PostgresCollectionStore(_db(primary), read_url=_db(standby))
    reader = PostgresCollectionStore(_db(primary), read_url=_db(standby))  # another server: no writes
    with writer, reader:
        writer.upsert("c", ids_for(20), x[:20], [{"i": i} for i in range(20)])
        standby.wait_replayed(primary)
        assert_exact(reader.search("c", x[3], 5), ids_for(20), x[:20], x[3], 5)
        # replay paused: the replica lags. The writer still sees its own write at once (its
        # reads fall back to the primary until the replica has replayed that far); the other
        # store reads the replica, which does not have it yet: reads really go there.
        _replay(_db(standby), "pause")
        try:
            writer.upsert("c", ["new"], x[20:21], [{"i": 99}])
            assert writer.search("c", x[20], 1)[0]["id"] == "new"
            assert writer.get("c", "new")["metadata"] == {"i": 99}
            assert reader.search("c", x[20], 1)[0]["id"] != "new"
            assert reader.describe("c")["count"] == 20
            assert writer.describe("c")["count"] == 21
        finally:
            _replay(_db(standby), "resume")
        standby.wait_replayed(primary)  # bounded wait on the replay LSN, not a sleep
        assert reader.search("c", x[20], 1)[0]["id"] == "new"
        assert reader.describe("c")["count"] == 21
        # writes never go to the replica: the reader's upsert lands on the primary
        reader.upsert("c", ["from-reader"], x[21:22])
        assert reader.get("c", "from-reader")["id"] == "from-reader"  # its own write: read at once
        with psycopg.connect(_db(primary)) as conn:
            (serial,) = conn.execute("SELECT serial FROM llave_collections WHERE name = 'c'").fetchone()
            assert conn.execute(f"SELECT count(*) FROM llave_docs_{serial}").fetchone()[0] == 22


def test_replica_down_falls_back_to_the_primary_and_primary_down_keeps_searches(primary_and_standby):
    primary, standby = primary_and_standby
    x = random_data(10, 4, 1)
    with PostgresCollectionStore(_db(primary), read_url=_db(standby)) as store:
        store.upsert("d", ids_for(10), x)
        standby.wait_replayed(primary)
        standby.stop()
        try:
            assert store.search("d", x[2], 1)[0]["id"] == "doc-2"  # served by the primary
        finally:
            standby.start()
        standby.wait_replayed(primary)
    with PostgresCollectionStore(_db(primary), read_url=_db(standby)) as store:
        primary.stop()
        try:
            assert store.search("d", x[4], 1)[0]["id"] == "doc-4"  # served by the replica alone
            with pytest.raises(StoreUnavailableError):
                store.upsert("d", ["more"], x[:1])
        finally:
            primary.start()
        store.upsert("d", ["more"], x[:1])
        assert store.describe("d")["count"] == 11
