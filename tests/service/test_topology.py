"""The server as a tree of processes (``--api-workers 2``): front ends, one engine, one
store. Real processes throughout: each is found by its title (``llave: engine``...) and
killed with SIGKILL where the test says so."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.service.conftest import HOLD_BATCH, Gate, start_server


def roles(server) -> dict[str, psutil.Process]:
    """The server's processes by role, from their titles."""
    found = {}
    root = psutil.Process(server.proc.pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if title.startswith("llave: "):
            found[title.removeprefix("llave: ").strip()] = proc
    return found


def wait_ready(server, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=5.0) as client:
        while True:
            try:
                if client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)


@pytest.fixture(scope="module")
def multi(tiny_checkpoint, tmp_path_factory):
    # A queue that the two front ends' shares (32 each) would split below the request limit.
    srv = start_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("multi"),
        "--api-workers", "2",
        "--max-queue", "64",
        "--max-inputs-per-request", "64",
    )  # fmt: skip
    yield srv
    srv.stop()


def test_a_request_within_the_advertised_limit_is_admitted_by_any_front_end(multi):
    info = httpx.get(multi.url + "/info").json()
    assert info["limits"]["max_inputs_per_request"] == 64
    assert info["limits"]["front_end_queue_share"] == 64
    body = {"inputs": [{"text": f"input {i}"} for i in range(40)]}
    for _ in range(4):  # new connections: either front end answers
        r = httpx.post(multi.url + "/embed", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["embeddings"]) == 40
    assert "more than its share of max_queue (64 / 2)" in multi.log()


def test_the_server_runs_its_roles_as_separate_processes(multi):
    assert {"server", "engine", "store", "api-0", "api-1"} <= set(roles(multi))
    info = httpx.get(multi.url + "/info").json()
    assert info["processes"]["api_workers"] == 2


def test_an_acknowledged_upsert_is_seen_by_the_next_search_from_any_front_end(multi):
    # Every request on a new connection: the kernel hands connections to either front end.
    for i in range(12):
        doc = {"id": f"d{i}", "text": f"document number {i}"}
        r = httpx.post(multi.url + "/collections/shared/documents", json={"documents": [doc]})
        assert r.status_code == 200, r.text
        hits = httpx.post(
            multi.url + "/search",
            json={"collection": "shared", "query": {"text": f"document number {i}"}, "k": 1},
        ).json()["hits"]
        assert hits[0]["id"] == f"d{i}"
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_embeddings_do_not_depend_on_the_front_end(multi, tiny_embedder):
    import numpy as np

    texts = [f"same input {i}" for i in range(6)]
    expected = tiny_embedder.embed([{"text": t} for t in texts])
    for _ in range(4):
        got = np.asarray(
            httpx.post(multi.url + "/embed", json={"inputs": [{"text": t} for t in texts]}).json()[
                "embeddings"
            ]
        )
        scale = float(np.abs(expected).max())
        assert np.abs(got - expected).max() <= 1e-5 * scale


def _upsert_until(url: str, stop: threading.Event, acked: list[list[str]], tag: str) -> None:
    batch = 0
    with httpx.Client(base_url=url, timeout=30.0) as client:
        while not stop.is_set():
            ids = [f"{tag}-{batch}-{j}" for j in range(4)]
            docs = [{"id": i, "text": f"text of {i}"} for i in ids]
            try:
                r = client.post("/collections/crash/documents", json={"documents": docs})
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if r.status_code == 200:
                acked.append(ids)
            batch += 1


@pytest.mark.parametrize("role", ["api-0", "store", "engine"])
def test_kill_9_of_any_process_loses_no_acknowledged_write(tiny_checkpoint, tmp_path, role):
    server = start_server(tiny_checkpoint, tmp_path, "--api-workers", "2")
    try:
        stop = threading.Event()
        acked: list[list[str]] = []
        threads = [
            threading.Thread(target=_upsert_until, args=(server.url, stop, acked, f"w{k}")) for k in range(3)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 5:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        victim = roles(server)[role]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        # The supervisor brings the role back; writes go on meanwhile (some refused).
        deadline = time.monotonic() + 120
        while role not in roles(server) or roles(server)[role].pid == victim.pid:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        wait_ready(server)
        before = len(acked)
        deadline = time.monotonic() + 60
        while len(acked) < before + 3:  # writes are acknowledged again after the restart
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        assert server.proc.poll() is None
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            stored: set[str] = set()
            cursor = None
            while True:
                params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
                page = client.get("/collections/crash/documents", params=params).json()
                stored |= {d["id"] for d in page["documents"]}
                cursor = page["next_cursor"]
                if not cursor:
                    break
        for ids in acked:
            assert set(ids) <= stored, f"acknowledged batch {ids} lost after kill -9 of {role}"
        batches: dict[str, set[str]] = {}
        for doc_id in stored:
            batches.setdefault(doc_id.rsplit("-", 1)[0], set()).add(doc_id)
        assert all(len(ids) == 4 for ids in batches.values()), "a partial batch was stored"
    finally:
        server.stop()


def test_sigterm_finishes_the_requests_in_flight(tiny_checkpoint, tmp_path):
    # The engine holds the first request's first batch until the test opens the gate (the
    # fault launcher's hold-batch, tests/service/faults.py); the other five are sent once it
    # is held, and the gate opens only once both front ends have seen SIGTERM (they stop
    # listening): so every request is certainly in flight when the server is told to stop,
    # whatever the machine's speed.
    gate = Gate(tmp_path / "gate")
    hold = HOLD_BATCH
    server = start_server(
        tiny_checkpoint,
        tmp_path,
        "--api-workers", "2",
        "--max-batch-size", "2",
        env={"TEST_LLAVE_FAULTS": f"hold-batch:{hold}", **gate.env},
    )  # fmt: skip
    long_text = " ".join(f"word{i}" for i in range(100))

    front_ends = [p for role, p in roles(server).items() if role.startswith("api-")]
    assert len(front_ends) == 2

    def front_ends_stopping() -> bool:
        """Both front ends have closed their copy of the listening socket: uvicorn does that
        first when it handles SIGTERM (the supervisor keeps its own copy until the end)."""
        for proc in front_ends:
            try:
                sockets = proc.net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == server.port for c in sockets):
                return False
        return True

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120.0) as client:
            held = {"inputs": [{"text": f"{hold} {long_text} {i}"} for i in range(8)]}
            tasks = [asyncio.create_task(client.post("/embed", json=held))]
            # The others go only once the held batch is on the device: sent together, another
            # front end's requests could reach the engine first and finish before it.
            await asyncio.to_thread(gate.wait_entered, server)
            bodies = [{"inputs": [{"text": f"{long_text} {k} {i}"} for i in range(8)]} for k in range(5)]
            tasks += [asyncio.create_task(client.post("/embed", json=body)) for body in bodies]
            deadline = time.monotonic() + 120  # hang guards only
            while server.metric("llave_queue_inputs") < 6 * 8:  # every request admitted
                assert time.monotonic() < deadline, server.log()
                await asyncio.sleep(0.02)
            assert not front_ends_stopping()  # the check can see a front end listen
            server.proc.send_signal(signal.SIGTERM)
            while not front_ends_stopping():
                assert time.monotonic() < deadline, server.log()
                await asyncio.sleep(0.02)
            assert not any(t.done() for t in tasks)  # all six still in flight at SIGTERM
            gate.open()
            return [(await t).status_code for t in tasks]

    try:
        statuses = asyncio.run(run())
        assert statuses == [200] * 6
        assert server.proc.wait(timeout=60) == 0
    finally:
        gate.open()
        server.stop()


def test_no_process_outlives_a_killed_server(tiny_checkpoint, tmp_path):
    server = start_server(tiny_checkpoint, tmp_path, "--api-workers", "2")
    try:
        children = [p for role, p in roles(server).items() if role != "server"]
        assert len(children) == 4  # engine, store, api-0, api-1
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=60)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    finally:
        server.stop()
