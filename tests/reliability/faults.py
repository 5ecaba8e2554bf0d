"""Injected faults and what must hold after each; shared by ``test_faults.py`` and the soak runner.

Each ``check_*`` asserts its invariants (plain asserts: pytest rewrites them, see conftest)
and returns counts for the summary table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.storage.store import CollectionStore
from tests.reliability.helpers import assert_clean_error, assert_healthy, files_under
from tests.service.conftest import FAIL_BATCH, KILL_WORKER, REPO, Server, free_port, start_server


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (needs root; the test is skipped where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


async def post_many(url: str, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(requests))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))


# --- a full disk, a read-only disk ---------------------------------------------------------------


def check_disk_full(checkpoint: Path, workdir: Path) -> dict[str, Any]:
    """Fill a 512 KiB disk: writes get a clean 503, reads and the model go on, nothing
    acknowledged is lost, writes resume once there is space, and the store checks clean."""
    with tmpfs(workdir / "disk", "512k") as disk:
        server = start_server(checkpoint, disk)  # data dir: disk/data
        acked: list[str] = []
        refusals = 0
        try:
            rng = np.random.default_rng(0)
            with server.client() as client:
                for b in range(500):
                    docs = [
                        {
                            "id": f"b{b}-{j}",
                            "vector": rng.standard_normal(16).tolist(),
                            "metadata": {"pad": "x" * 400},
                        }
                        for j in range(8)
                    ]
                    response = client.post("/collections/full/documents", json={"documents": docs})
                    if response.status_code == 200:
                        acked += [d["id"] for d in docs]
                        continue
                    error = assert_clean_error(response, {503})
                    assert error["type"] == "unavailable" and response.headers.get("retry-after")
                    assert "store" in error["message"]
                    refusals += 1
                    if refusals == 3:  # refused again and again, each time cleanly
                        break
                assert refusals, "the disk never filled up"
                assert_healthy(server.url)
                found = client.post("/collections/full/existing", json={"ids": acked}).json()["existing"]
                assert len(found) == len(acked)
                query = {"collection": "full", "query": {"vector": [1.0] * 16}, "k": 3}
                assert client.post("/search", json=query).status_code == 200
                remount(disk, "size=16m")  # space again
                after = {"documents": [{"id": "after", "vector": [1.0] * 16}]}
                response = client.post("/collections/full/documents", json=after)
                assert response.status_code == 200, response.text
                acked.append("after")
        finally:
            server.stop()
        with CollectionStore(disk / "data", background_rebuild=False) as store:
            assert store.integrity_check() == []
            lost = set(acked) - store.existing_ids("full", acked)
            assert not lost, sorted(lost)[:10]
            assert store.describe("full")["count"] == len(acked)
    return {
        "writes_refused_503": refusals,
        "acked_docs": len(acked),
        "acked_docs_lost": len(lost),
        "recovered": True,
    }


def check_read_only_data_dir(checkpoint: Path, workdir: Path) -> dict[str, Any]:
    """The server refuses to start (non-zero exit, the cause in its log) and touches nothing."""
    with tmpfs(workdir / "disk", "8m") as disk:
        with CollectionStore(disk / "data") as store:
            store.upsert("kept", ["a", "b"], np.eye(2, 8))
        remount(disk, "ro")
        before = {p: (disk / p).stat().st_mtime_ns for p in files_under(disk)}
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAVE_")}
        env["LLAVE_API_WORKERS"] = "1"  # the store opens in the server process itself
        command = [
            sys.executable, "-m", "service", "--model", str(checkpoint), "--port", str(free_port()),
            "--data-dir", str(disk / "data"), "--log-level", "warning",
        ]  # fmt: skip
        done = subprocess.run(
            command, cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, timeout=180
        )
        log = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode != 0, log
        assert "Read-only file system" in log and "collection store could not open" in log, log
        assert {p: (disk / p).stat().st_mtime_ns for p in files_under(disk)} == before
        remount(disk, "rw")
        with CollectionStore(disk / "data") as store:
            assert store.integrity_check() == []
            assert store.existing_ids("kept", ["a", "b"]) == {"a", "b"}
    return {"exit_code": done.returncode, "files_changed": 0}


# --- a failing batch, a dead worker ---------------------------------------------------------------


def check_failing_batches(server: Server, embedder: Any, rounds: int) -> dict[str, Any]:
    """Good requests sent together with bad ones all get their own, correct vectors, also
    when they shared the failing forward pass (the engine runs a failed batch again by
    halves); an upsert whose embedding fails stores nothing."""
    counts = {"bad_requests": 0, "good_requests": 0, "good_ok": 0, "good_failed_with_a_bad_batch": 0}
    for round_no in range(rounds):
        texts = [f"good request {round_no}-{i}" for i in range(24)]
        requests = [("/embed", {"inputs": [{"text": t}]}) for t in texts]
        bad_at = (5, 17)
        for i in sorted(bad_at, reverse=True):
            requests.insert(i, ("/embed", {"inputs": [{"text": f"bad {FAIL_BATCH} {round_no}"}]}))
        docs = [{"id": f"good-{round_no}-{j}", "vector": [1.0, float(j)]} for j in range(4)]
        requests.append((f"/collections/faults-{round_no}/documents", {"documents": docs}))
        bad_docs = [{"id": "t", "text": "fine"}, {"id": "u", "text": FAIL_BATCH}]
        requests.append((f"/collections/faults-bad-{round_no}/documents", {"documents": bad_docs}))
        responses = asyncio.run(post_many(server.url, requests))

        good, failed_good = [], 0
        for (_, body), response in zip(requests, responses, strict=True):
            text = body.get("inputs", [{}])[0].get("text", "")
            if FAIL_BATCH in text:
                assert assert_clean_error(response, {500})["type"] == "inference_error"
            elif "inputs" in body:
                if response.status_code == 200:
                    good.append((text, response.json()["embeddings"][0]))
                else:
                    assert assert_clean_error(response, {500})["type"] == "inference_error"
                    failed_good += 1
        # a failed forward pass is run again by halves: only the bad inputs fail
        assert failed_good == 0, failed_good
        assert good, "every good request failed"
        expected = embedder.embed([{"text": t} for t, _ in good])
        np.testing.assert_allclose(np.asarray([v for _, v in good]), expected, atol=1e-5)
        assert responses[-2].status_code == 200  # vector upsert: no forward pass
        assert_clean_error(responses[-1], {500})  # the whole upsert failed, and stored nothing
        with server.client() as client:
            assert client.get(f"/collections/faults-bad-{round_no}").status_code == 404
        counts["bad_requests"] += len(bad_at) + 1
        counts["good_requests"] += len(texts)
        counts["good_ok"] += len(good)
        counts["good_failed_with_a_bad_batch"] += failed_good
    assert_healthy(server.url)
    return counts


def check_dead_worker(checkpoint: Path, workdir: Path) -> dict[str, Any]:
    """Requests in flight when the engine dies all get an answer (200 or 503), never a hang;
    with no restarts allowed the server exits non-zero for the orchestrator to restart it,
    and a new server on the same data finds everything that was stored."""
    server = start_server(
        checkpoint,
        workdir,
        "--max-batch-size",
        "4",
        "--engine-restarts",
        "0",
        env={"TEST_LLAVE_FAULTS": f"kill-worker:{KILL_WORKER}"},
    )
    try:
        with server.client() as client:
            upsert = {"documents": [{"id": "v", "vector": [1.0, 0.0]}]}
            assert client.post("/collections/kept/documents", json=upsert).status_code == 200
        requests = [("/embed", {"inputs": [{"text": f"in flight {i}"}]}) for i in range(16)]
        requests.insert(8, ("/embed", {"inputs": [{"text": KILL_WORKER}]}))
        responses = asyncio.run(post_many(server.url, requests))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert responses[8].status_code == 503
        for response in responses:
            if response.status_code == 503:
                assert assert_clean_error(response)["type"] == "unavailable"
        assert server.proc.wait(timeout=60) == 1  # exits for the orchestrator to restart it
    finally:
        server.stop()
    # What was stored is there for the next server.
    restarted = start_server(checkpoint, workdir)
    try:
        with restarted.client() as client:
            assert client.get("/collections/kept").json()["count"] == 1
            hits = client.post(
                "/search", json={"collection": "kept", "query": {"vector": [1.0, 0.0]}}
            ).json()["hits"]
            assert hits[0]["id"] == "v"
    finally:
        restarted.stop()
    return {
        "in_flight": len(requests),
        "answered_200": statuses.count(200),
        "answered_503": statuses.count(503),
    }
