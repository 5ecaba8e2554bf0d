"""One engine per device (``--devices``): the list of devices a spec resolves to, and a real
server with two CPU engines (``--devices cpu,cpu``) and two front ends, whose vectors match
the one-engine server's, which sends work to the less loaded engine, and which loses no
request when one engine is killed with SIGKILL under load.

The server tests see which engine did what through the per-engine metrics
(``llave_batches_total{engine}``, ``llave_engine_queue_inputs{engine}``) and hold an
engine busy with the ``hold-batch`` fault's gate (``tests/service/faults.py``): they wait
on files and counters, never on a timer (deadlines below only guard against a hang)."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from service.inference.hardware import resolve_devices
from service.settings import Settings
from tests.service.conftest import HOLD_BATCH, Gate, start_server
from tests.service.test_topology import roles

# --- which devices a --devices value names ------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "cuda", "expected"),
    [
        ("auto", 0, ["cpu"]),
        ("auto", 2, ["cuda:0", "cuda:1"]),
        ("2", 4, ["cuda:0", "cuda:1"]),
        ("3", 0, ["cpu", "cpu", "cpu"]),
        ("cuda:1, cuda:3", 0, ["cuda:1", "cuda:3"]),  # a list is taken as given
        ("cpu,cpu", 8, ["cpu", "cpu"]),
        ("cuda", 1, ["cuda:0"]),
    ],
)
def test_devices_resolve_to_one_engine_each(spec, cuda, expected):
    assert resolve_devices(spec, cuda_count=cuda) == expected


def test_more_engines_than_visible_gpus_is_refused():
    with pytest.raises(ValueError, match="2 CUDA"):
        resolve_devices("3", cuda_count=2)


@pytest.mark.parametrize("spec", ["0", "gpu", "cuda:x", "cpu:1", ","])
def test_a_malformed_devices_value_is_refused(spec):
    with pytest.raises(ValidationError):
        Settings(model="m", devices=spec)


def test_devices_and_a_specific_device_contradict_each_other():
    with pytest.raises(ValidationError, match="not both"):
        Settings(model="m", device="cuda:1", devices="cuda:0,cuda:1")
    assert Settings(model="m", devices="").devices is None  # LLAVE_DEVICES= : one engine


def test_each_engine_gets_its_own_configuration():
    configs = Settings(model="m", devices="cpu,cpu", max_batch_size=7).engine_configs(cuda_count=0)
    assert [(c.index, c.device, c.max_batch_size) for c in configs] == [(0, "cpu", 7), (1, "cpu", 7)]
    assert all(c.cpu_threads is not None and c.cpu_threads >= 1 for c in configs)  # they split the cores
    one = Settings(model="m", device="cpu").engine_configs()
    assert [(c.index, c.device, c.cpu_threads) for c in one] == [(0, "cpu", None)]


# --- a server with two engines -------------------------------------------------------------

ENGINES = ("0", "1")
HELD_TEXT = f"{HOLD_BATCH} " + "a long text that keeps its engine loaded " * 20


@pytest.fixture(scope="module")
def two_engines(tiny_checkpoint, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two-engines")
    gate = Gate(workdir / "gate")
    srv = start_server(
        tiny_checkpoint,
        workdir,
        "--devices", "cpu,cpu",
        "--api-workers", "2",  # two front ends: each routes by the engines' shared load
        "--max-batch-size", "4",
        "--engine-restarts", "2",
        env={"TEST_LLAVE_FAULTS": f"hold-batch:{HOLD_BATCH}", **gate.env},
    )  # fmt: skip
    srv.gate = gate
    try:
        _wait_all_ready(srv)
    except BaseException:
        srv.stop()
        raise
    yield srv
    gate.open()
    srv.stop()


def _until(condition, server, what: str, timeout: float = 120.0) -> None:
    """Wait for ``condition()`` (a hang guard only: the tests never assert on time)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened:\n{server.log()[-4000:]}"
        time.sleep(0.02)


def _devices(server) -> list[dict]:
    return httpx.get(server.url + "/ready", timeout=10).json()["devices"]


def _wait_all_ready(server) -> None:
    """/ready is 200 once one engine serves; this waits for both."""
    _until(lambda: {d["status"] for d in _devices(server)} == {"ready"}, server, "both engines ready", 300.0)


def _batches(server) -> dict[str, float]:
    return {e: server.metric("llave_batches_total", f'engine="{e}"') for e in ENGINES}


def _holding(server) -> str:
    """The engine holding the gated batch (the only inputs queued anywhere)."""
    queued = {e: server.metric("llave_engine_queue_inputs", f'engine="{e}"') for e in ENGINES}
    busy = [e for e, n in queued.items() if n > 0]
    assert len(busy) == 1, queued
    return busy[0]


class Held:
    """One request whose batch waits on the gate, posted from a thread."""

    def __init__(self, server) -> None:
        self.server = server
        self.response: httpx.Response | None = None
        self.thread = threading.Thread(target=self._post)
        self.thread.start()
        server.gate.wait_entered(server)

    def _post(self) -> None:
        with self.server.client() as client:
            self.response = client.post("/embed", json={"inputs": [{"text": HELD_TEXT}]})

    def release(self) -> httpx.Response:
        self.server.gate.open()
        self.thread.join()
        self.server.gate.reset()
        assert self.response is not None
        return self.response


def _inputs(png_b64) -> list[dict]:
    return [
        {"text": "a red square on a white table"},
        {"image": png_b64(40, 30)},
        {"text": "what is shown?", "image": png_b64(24, 48, (20, 90, 200))},
        {"content": [{"type": "text", "text": "before"}, {"type": "image", "image": png_b64(16, 16)}]},
    ]


def test_each_device_is_reported_by_the_probes(two_engines):
    for path in ("/health", "/ready"):
        body = httpx.get(two_engines.url + path).json()
        assert [(d["engine"], d["device"], d["status"]) for d in body["devices"]] == [
            (0, "cpu", "ready"),
            (1, "cpu", "ready"),
        ]
    info = httpx.get(two_engines.url + "/info").json()
    assert info["processes"]["engines"] == 2 and len(info["devices"]) == 2
    assert {"engine-0", "engine-1"} <= set(roles(two_engines))
    assert two_engines.metric("llave_engine_ready") == 2


def test_vectors_equal_the_one_engine_servers(two_engines, server, png_b64):
    """Same inputs, same vectors as the one-engine server's, on each of the two engines
    (told apart by their batch counters; idle engines take turns)."""
    body = {"inputs": _inputs(png_b64), "normalize": False}
    expected = np.asarray(httpx.post(server.url + "/embed", json=body, timeout=60).json()["embeddings"])
    scale = float(np.abs(expected).max())
    ran_on: set[str] = set()
    with two_engines.client() as client:
        for _ in range(8):
            before = _batches(two_engines)
            got = np.asarray(client.post("/embed", json=body).json()["embeddings"])
            after = _batches(two_engines)
            ran_on |= {e for e in ENGINES if after[e] > before[e]}
            assert got.shape == expected.shape
            assert np.abs(got - expected).max() <= 1e-5 * scale
            if ran_on == set(ENGINES):
                break
    assert ran_on == set(ENGINES)


def _post_many(url: str, n: int, threads: int) -> list[int]:
    statuses: list[int] = []

    def run(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(k, n, threads):
                statuses.append(client.post("/embed", json={"inputs": [{"text": f"load {i}"}]}).status_code)

    pool = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return statuses


def test_requests_go_to_the_less_loaded_engine(two_engines):
    """While one engine holds a long batch, concurrent requests from both front ends are
    run by the other; once it is released, the first engine runs its batch too."""
    before = _batches(two_engines)
    held = Held(two_engines)
    busy = _holding(two_engines)
    free = next(e for e in ENGINES if e != busy)
    assert set(_post_many(two_engines.url, 16, 4)) == {200}  # none waited for the held engine
    during = _batches(two_engines)
    assert during[busy] == before[busy] and during[free] > before[free], (before, during)
    assert held.release().status_code == 200
    assert _batches(two_engines)[busy] > before[busy]
    assert two_engines.metric("llave_engine_queue_inputs") == 0  # nothing left held


def test_sigkill_of_one_engine_under_load_fails_no_request(two_engines):
    """The request in flight on the killed engine is sent to the other one (its held batch
    reaches the other engine's device), requests under load all succeed, the killed
    engine comes back and gets work again, and the other never stopped."""
    stop = threading.Event()
    statuses: list[tuple[int, str]] = []

    def load(k: int) -> None:
        with two_engines.client() as client:
            i = 0
            while not stop.is_set():
                r = client.post("/embed", json={"inputs": [{"text": f"kill load {k} {i}"}] * (1 + i % 3)})
                statuses.append((r.status_code, r.text[:200] if r.status_code != 200 else ""))
                i += 1

    held = Held(two_engines)  # before the load: the only inputs queued are the held ones
    victim_index = _holding(two_engines)
    survivor_index = next(e for e in ENGINES if e != victim_index)
    procs = roles(two_engines)
    victim, survivor = procs[f"engine-{victim_index}"], procs[f"engine-{survivor_index}"]
    threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        _until(lambda: len(statuses) >= 8, two_engines, "load on the other engine")
        two_engines.gate.reset()  # the held request's next try will enter it again
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        two_engines.gate.wait_entered(two_engines)  # the same request, now on the survivor
        assert two_engines.metric("llave_engine_queue_inputs", f'engine="{survivor_index}"') >= 1
        response = held.release()
        assert response.status_code == 200, response.text

        def back() -> bool:
            new = roles(two_engines).get(f"engine-{victim_index}")
            return (
                new is not None
                and new.pid != victim.pid
                and _devices(two_engines)[int(victim_index)]["status"] == "ready"
            )

        _until(back, two_engines, "the killed engine's return")
        restarted = _batches(two_engines)[victim_index]
        _until(lambda: _batches(two_engines)[victim_index] > restarted, two_engines, "work on the new engine")
    finally:
        stop.set()
        two_engines.gate.open()
        for t in threads:
            t.join()
        two_engines.gate.reset()
    failed = [s for s in statuses if s[0] != 200]
    assert not failed, failed[:5]
    assert len(statuses) > 0
    assert roles(two_engines)[f"engine-{survivor_index}"].pid == survivor.pid  # never stopped
    assert "restarting it (1 of at most 2)" in two_engines.log()
    assert "sending it to another engine" in two_engines.log()
    assert httpx.get(two_engines.url + "/health").status_code == 200
