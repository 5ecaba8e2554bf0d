"""Crash safety: SIGKILL a writer at random moments; what it was told is stored must survive.

A child process upserts batches (and replaces and deletes some) in a loop and prints a line
after each call returns. The test kills it with SIGKILL at a random moment, reopens the
store and checks: every acknowledged write is there, no batch is partly written, and the
index agrees with SQLite. Several rounds run against the same data directory.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from service.storage.store import CollectionStore

ROOT = Path(__file__).resolve().parents[2]
BATCH, DIM = 12, 16

CHILD = r"""
import sys
import numpy as np
from service.storage.store import CollectionStore

data_dir, rnd, batch_size, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(rnd)
store = CollectionStore(data_dir)
store.open()
print("OPEN", flush=True)
b = 0
while True:
    ids = [f"r{rnd}-b{b}-{j}" for j in range(batch_size)]
    store.upsert("crash", ids, rng.standard_normal((batch_size, dim)), [{"r": rnd, "b": b}] * batch_size)
    print(f"ACK r{rnd}-b{b}", flush=True)
    if b % 3 == 2:  # replace the whole batch: new vectors and metadata, all or nothing
        store.upsert("crash", ids, rng.standard_normal((batch_size, dim)), [{"r": rnd, "b": b, "v": 2}] * batch_size)
        print(f"REP r{rnd}-b{b}", flush=True)
    if b % 4 == 3:
        victim = f"r{rnd}-b{b - 1}-0"
        print(f"WILL-DEL {victim}", flush=True)
        store.delete("crash", victim)
        print(f"DEL {victim}", flush=True)
    b += 1
"""


def run_and_kill(data_dir: Path, rnd: int, rng: random.Random) -> list[str]:
    """Start the writer, SIGKILL it after a random number of acknowledgements, return its lines."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    err_path = data_dir.parent / f"writer-{rnd}.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data_dir), str(rnd), str(BATCH), str(DIM)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=ROOT,
            env=env,
        )
    lines: list[str] = []
    acks_wanted = rng.randint(2, 25)
    try:
        while sum(line.startswith("ACK") for line in lines) < acks_wanted:
            line = proc.stdout.readline()
            assert line, f"writer died on its own: {err_path.read_text()}"
            lines.append(line)
        time.sleep(rng.uniform(0, 0.03))  # let it get somewhere into the next write
    finally:
        proc.send_signal(signal.SIGKILL)
        # read through the same buffered reader: communicate() would skip what readline() buffered
        lines += proc.stdout.readlines()
        proc.stdout.close()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # only whole lines count: a line cut short by the kill was never acknowledged
    return [line.strip() for line in lines if line.endswith("\n")]


def parse(lines: list[str]) -> tuple[set[str], set[str], set[str], set[str]]:
    acked, replaced, deleted, maybe_deleted = set(), set(), set(), set()
    for line in lines:
        kind, _, what = line.partition(" ")
        if kind in ("ACK", "REP", "DEL", "WILL-DEL"):
            {"ACK": acked, "REP": replaced, "DEL": deleted, "WILL-DEL": maybe_deleted}[kind].add(what)
    return acked, replaced, deleted, maybe_deleted - deleted


def test_kill_9_loses_nothing_acknowledged_and_no_batch_is_partial(tmp_path):
    data_dir = tmp_path / "data"
    rng = random.Random(1234)
    acked: set[str] = set()  # batch names, e.g. "r0-b3"
    replaced: set[str] = set()
    deleted: set[str] = set()  # doc ids
    unconfirmed: set[str] = set()  # deletes cut off by a kill: they may or may not have committed
    for rnd in range(5):
        lines = run_and_kill(data_dir, rnd, rng)
        got_acked, got_replaced, got_deleted, in_flight_delete = parse(lines)
        unconfirmed |= in_flight_delete
        assert got_acked, lines
        acked |= got_acked
        replaced |= got_replaced
        deleted |= got_deleted

        with CollectionStore(data_dir, background_rebuild=False) as store:
            assert store.integrity_check() == []
            count = store.describe("crash")["count"]
            stored_ids = set()
            for batch in {f"r{r}-b{b}" for r in range(rnd + 1) for b in range(200)}:
                ids = [f"{batch}-{j}" for j in range(BATCH)]
                present = store.existing_ids("crash", ids)
                stored_ids |= present
                expected_gone = {doc for doc in ids if doc in deleted}
                maybe_gone = {doc for doc in ids if doc in unconfirmed}
                if batch in acked:
                    assert set(ids) - present - maybe_gone == expected_gone, (
                        f"acknowledged batch {batch} damaged"
                    )
                elif present:  # an unacknowledged batch may have committed, but only whole
                    assert set(ids) - present - maybe_gone == set(), (
                        f"partial batch {batch}: {sorted(present)}"
                    )
                versions = {store.get("crash", doc)["metadata"].get("v") for doc in present}
                assert len(versions) <= 1, f"batch {batch} partly replaced"
                if batch in replaced and present:
                    assert versions == {2}, f"acknowledged replacement of {batch} lost"
            assert count == len(stored_ids)
            # every stored document is searchable by its own vector, and is its own best hit
            docs = sorted(stored_ids)
            vectors = np.stack([store.get("crash", doc, with_vector=True)["vector"] for doc in docs])
            for doc, hits in zip(docs, store.search_many("crash", vectors, 1), strict=True):
                assert hits[0]["id"] == doc and abs(hits[0]["score"] - 1) < 1e-5
