"""``kill -9`` of the server while clients upsert over HTTP; what was acknowledged must survive.

One round: start the server on the shared data directory, let writer threads upsert
batches (raw vectors, and texts embedded by the model), replace some batches and delete
some documents, then SIGKILL the server at a random moment and check the store directly
(the server is dead): ``integrity_check()`` is empty, every acknowledged batch is there
whole with the acknowledged version of its vectors, no batch is partly written or partly
replaced, acknowledged deletes stayed deleted, and every stored document is its own
nearest neighbour.

The same rounds run on PostgreSQL (``store_url``: the server gets ``--store-url``), and with
PostgreSQL as the victim (``postgres``: a ``tests.postgres.PostgresServer``): it is killed
with SIGKILL while the server keeps taking upserts (answered 503 meanwhile), then restarted;
the server must recover on its own, and the same checks hold (an upsert or delete answered
503 may or may not have committed, since the kill can fall between the commit and its reply,
but an upsert is still all or nothing).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.storage import open_store
from tests.service.conftest import start_server

COLLECTION, BATCH, DIM = "crash", 8, 64  # 64: the tiny model's dimension (text documents share it)


def batch_vectors(name: str, version: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{name}:{version}".encode()))
    return rng.standard_normal((BATCH, DIM)).astype(np.float32)


def batch_ids(name: str) -> list[str]:
    return [f"{name}-{j}" for j in range(BATCH)]


@dataclass
class Ledger:
    """What the clients were told (acknowledged) and what was in flight at the kill."""

    acked: dict[str, int] = field(default_factory=dict)  # batch -> acknowledged version
    attempted: dict[str, set[int]] = field(default_factory=dict)  # batch -> versions sent
    text_batches: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)  # acknowledged deletes (doc ids)
    maybe_deleted: set[str] = field(default_factory=set)  # deletes cut off by the kill (or 503)
    unexpected: list[str] = field(default_factory=list)
    refused: int = 0  # 503s (PostgreSQL down), when tolerated
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class CrashReport:
    rounds: int = 0
    kills: int = 0
    acked_batches: int = 0
    acked_docs: int = 0  # acknowledged and not deleted since
    unacked_batches_stored: set[str] = field(default_factory=set)  # in flight at a kill, committed whole
    lost_acked_docs: set[str] = field(default_factory=set)
    partial_batches: set[str] = field(default_factory=set)
    integrity_problems: set[str] = field(default_factory=set)

    def summary(self) -> dict:
        return {
            "rounds": self.rounds,
            "kills": self.kills,
            "acked_batches": self.acked_batches,
            "acked_docs": self.acked_docs,
            "in_flight_batches_committed": len(self.unacked_batches_stored),
            "acked_docs_lost": len(self.lost_acked_docs),
            "partial_batches": len(self.partial_batches),
            "integrity_problems": len(self.integrity_problems),
        }


def _writer(
    url: str, ledger: Ledger, prefix: str, text: bool, stop: threading.Event, seed: int, tolerate_503: bool
) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=30) as client:
        b = 0
        while not stop.is_set():
            name = f"{prefix}-b{b}"
            version = 1
            replace = b >= 1 and b % 3 == 0 and not text
            if replace:  # replace the previous batch with new vectors, all or nothing
                name, version = f"{prefix}-b{b - 1}", 2
            with ledger.lock:
                ledger.attempted.setdefault(name, set()).add(version)
                if text:
                    ledger.text_batches.add(name)
            if text:
                docs = [
                    {"id": i, "text": f"document {i} about shapes", "metadata": {"v": version}}
                    for i in batch_ids(name)
                ]
            else:
                docs = [
                    {"id": i, "vector": v.tolist(), "metadata": {"v": version}}
                    for i, v in zip(batch_ids(name), batch_vectors(name, version), strict=True)
                ]
            try:
                response = client.post(f"/collections/{COLLECTION}/documents", json={"documents": docs})
            except httpx.TransportError:
                return  # the server is gone
            if response.status_code == 200:
                with ledger.lock:
                    ledger.acked[name] = version
            elif response.status_code == 503 and tolerate_503:
                with ledger.lock:
                    ledger.refused += 1
                time.sleep(0.02)
            else:
                ledger.unexpected.append(f"upsert {name}: {response.status_code} {response.text[:200]}")
            if not text and b % 4 == 3 and rng.random() < 0.7:
                victim = f"{prefix}-b{b - 2}-{rng.randrange(BATCH)}"
                with ledger.lock:
                    ledger.maybe_deleted.add(victim)
                try:
                    response = client.delete(f"/collections/{COLLECTION}/documents/{victim}")
                except httpx.TransportError:
                    return
                with ledger.lock:
                    if response.status_code == 503 and tolerate_503:
                        ledger.refused += 1  # may have committed before PostgreSQL died: stays "maybe"
                    else:
                        ledger.maybe_deleted.discard(victim)
                    if response.status_code == 200:
                        ledger.deleted.add(victim)
                    # 404: a batch number skipped by a replacement; a lost document shows as missing
            b += 1


def _store_args(store_url: str | None) -> tuple[str, ...]:
    return ("--store-url", store_url) if store_url else ()


def _wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)


def crash_round(
    checkpoint: Path,
    workdir: Path,
    round_no: int,
    ledger: Ledger,
    rng: random.Random,
    *,
    writers: int = 4,
    store_url: str | None = None,
    postgres: Any = None,
) -> None:
    """Start, write concurrently, SIGKILL after a random number of acknowledgements: the
    server, or (``postgres`` given) PostgreSQL, which is then restarted under the live server."""
    server = start_server(
        checkpoint, workdir, "--max-batch-size", "8", "--preprocess-workers", "1", *_store_args(store_url)
    )
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_writer,
            args=(
                server.url,
                ledger,
                f"r{round_no}-w{w}",
                w == writers - 1,
                stop,
                rng.random(),
                postgres is not None,
            ),
            daemon=True,
        )
        for w in range(writers)
    ]
    try:
        start_acks = len(ledger.acked)
        for thread in threads:
            thread.start()
        wanted = rng.randint(2, 12)
        _wait_for(lambda: len(ledger.acked) - start_acks >= wanted)
        time.sleep(rng.uniform(0, 0.2))  # somewhere into the next writes
        if postgres is None:
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=30)
        else:
            refused = ledger.refused
            postgres.kill()
            _wait_for(lambda: ledger.refused > refused, 30)  # the server notices: 503s
            postgres.start()
            restarted = len(ledger.acked)
            _wait_for(lambda: len(ledger.acked) - restarted >= 3)  # and recovers on its own
            assert len(ledger.acked) - restarted >= 3, (
                f"no write acknowledged after the restart:\n{server.log()}"
            )
            assert ledger.refused > refused, "PostgreSQL was killed but no request got 503"
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        server.stop()
    if postgres is None:
        assert server.proc.returncode == -signal.SIGKILL
    else:
        assert server.proc.returncode is not None and server.proc.returncode != -signal.SIGKILL
    assert len(ledger.acked) > start_acks, f"no write acknowledged in round {round_no}:\n{server.log()}"


def verify_store(location: Path | str, ledger: Ledger, report: CrashReport) -> None:
    """Open the store directly (the server is dead) and hold it to the ledger."""
    with open_store(location, background_rebuild=False) as store:
        report.integrity_problems.update(store.integrity_check())
        stored: set[str] = set()
        for name, versions in ledger.attempted.items():
            ids = batch_ids(name)
            gone = {i for i in ids if i in ledger.deleted}
            maybe_gone = {i for i in ids if i in ledger.maybe_deleted}
            present = store.existing_ids(COLLECTION, ids)
            stored |= present
            missing = set(ids) - present - gone - maybe_gone
            if name in ledger.acked:
                report.lost_acked_docs |= missing | (present & gone)  # lost, or an acknowledged delete undone
            elif present:
                report.unacked_batches_stored.add(name)
                if missing:
                    report.partial_batches.add(name)
            if name in ledger.text_batches or not present:
                continue
            found_versions = set()
            for doc_id in present:
                doc = store.get(COLLECTION, doc_id, with_vector=True)
                found_versions.add(doc["metadata"]["v"])
                expected = batch_vectors(name, doc["metadata"]["v"])[ids.index(doc_id)]
                if not np.allclose(doc["vector"], expected / np.linalg.norm(expected), atol=1e-5):
                    report.integrity_problems.add(f"{doc_id}: stored vector differs from what was sent")
            if len(found_versions) > 1:
                report.partial_batches.add(name)  # partly replaced
            acked_version = ledger.acked.get(name)
            if acked_version is not None and found_versions and max(found_versions) < acked_version:
                report.lost_acked_docs |= present  # an acknowledged replacement lost
            if not found_versions <= versions:
                report.integrity_problems.add(f"{name}: versions {found_versions} never sent")
        if stored and store.describe(COLLECTION)["count"] != len(stored):
            report.integrity_problems.add(
                f"count {store.describe(COLLECTION)['count']} != {len(stored)} stored ids"
            )
        # Every stored document is its own nearest neighbour (the index agrees with SQLite).
        docs = sorted(stored)
        if docs:
            vectors = np.stack([store.get(COLLECTION, d, with_vector=True)["vector"] for d in docs])
            for doc, hits in zip(docs, store.search_many(COLLECTION, vectors, 1), strict=True):
                if hits[0]["id"] != doc and abs(hits[0]["score"] - 1) > 1e-5:
                    report.integrity_problems.add(f"{doc} is not its own nearest neighbour")
    report.acked_batches = len(ledger.acked)
    report.acked_docs = len(ledger.acked) * BATCH - len(ledger.deleted)


def run_crash_rounds(
    checkpoint: Path,
    workdir: Path,
    rounds: int,
    seed: int = 0,
    *,
    store_url: str | None = None,
    postgres: Any = None,
) -> tuple[CrashReport, Ledger]:
    rng = random.Random(seed)
    ledger = Ledger()
    report = CrashReport()
    for round_no in range(rounds):
        crash_round(checkpoint, workdir, round_no, ledger, rng, store_url=store_url, postgres=postgres)
        report.rounds += 1
        report.kills += 1
        verify_store(store_url or workdir / "data", ledger, report)
    return report, ledger


def check_kill_9(
    checkpoint: Path,
    workdir: Path,
    rounds: int,
    seed: int = 0,
    *,
    store_url: str | None = None,
    postgres: Any = None,
) -> dict:
    """``rounds`` kills, each checked on the store; then the restarted server serves it all.

    ``store_url``: the server keeps collections in PostgreSQL there; ``postgres`` (its
    ``PostgresServer``): PostgreSQL is the one killed, and restarted, each round."""
    report, ledger = run_crash_rounds(
        checkpoint, workdir, rounds, seed=seed, store_url=store_url, postgres=postgres
    )
    assert not ledger.unexpected, ledger.unexpected[:5]
    assert report.kills == rounds and report.acked_batches > 0
    assert not report.lost_acked_docs, sorted(report.lost_acked_docs)[:10]
    assert not report.partial_batches, sorted(report.partial_batches)
    assert not report.integrity_problems, sorted(report.integrity_problems)[:10]

    with open_store(store_url or workdir / "data", background_rebuild=False) as store:
        count = store.describe(COLLECTION)["count"]
    server = start_server(checkpoint, workdir, *_store_args(store_url))
    try:
        with server.client() as client:
            assert client.get(f"/collections/{COLLECTION}").json()["count"] == count
            vector_batches = [b for b in ledger.acked if b not in ledger.text_batches]
            for name in vector_batches[:: max(1, len(vector_batches) // 10)]:
                for doc_id in batch_ids(name)[:2]:
                    if doc_id in ledger.deleted or doc_id in ledger.maybe_deleted:
                        continue
                    # The acknowledged version, or a later replacement that was in flight at a kill.
                    version = client.get(f"/collections/{COLLECTION}/documents/{doc_id}").json()["metadata"][
                        "v"
                    ]
                    assert version >= ledger.acked[name]
                    vector = batch_vectors(name, version)[batch_ids(name).index(doc_id)]
                    query = {"collection": COLLECTION, "query": {"vector": vector.tolist()}, "k": 1}
                    hits = client.post("/search", json=query).json()["hits"]
                    assert hits[0]["id"] == doc_id and abs(hits[0]["score"] - 1) < 1e-5, (hits, doc_id)
    finally:
        server.stop()
    return report.summary()
