"""Faults: kill -9 during concurrent upserts, a full disk, a read-only data directory, a
failing batch among good ones, a dead model worker. The checks live in ``crash.py`` and
``faults.py`` (the soak runner repeats them at a larger scale)."""

from __future__ import annotations

import os

from tests.reliability.crash import check_kill_9
from tests.reliability.faults import (
    check_dead_worker,
    check_disk_full,
    check_failing_batches,
    check_read_only_data_dir,
)

ROUNDS = int(os.environ.get("RELIABILITY_CRASH_ROUNDS", "3"))


def test_kill_9_during_concurrent_upserts_loses_nothing_acknowledged(tiny_checkpoint, tmp_path):
    print("kill -9:", check_kill_9(tiny_checkpoint, tmp_path, ROUNDS, seed=7))


def test_a_full_disk_refuses_writes_with_503_keeps_serving_and_recovers(tiny_checkpoint, tmp_path):
    print("disk full:", check_disk_full(tiny_checkpoint, tmp_path))


def test_a_read_only_data_dir_stops_the_server_with_a_clear_message(tiny_checkpoint, tmp_path):
    """No setting opens the store read-only, so a server whose writes could never succeed
    refuses to start rather than serve."""
    check_read_only_data_dir(tiny_checkpoint, tmp_path)


def test_a_failing_batch_fails_only_its_own_requests(rel_server, tiny_embedder):
    print("failing batches:", check_failing_batches(rel_server, tiny_embedder, rounds=3))


def test_a_dead_worker_fails_requests_fast_and_health_says_so(tiny_checkpoint, tmp_path):
    print("dead worker:", check_dead_worker(tiny_checkpoint, tmp_path))
