"""Real servers for the API tests: ``python -m service`` in a subprocess on a free port.

Each server serves the session's tiny checkpoint (see ``tests/conftest.py``) and logs to a
file; ``readiness`` holds what ``/ready`` answered from the moment the process started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]

FAIL_BATCH = "__fail_this_batch__"
KILL_WORKER = "__kill_the_worker__"
HOLD_BATCH = "__hold_this_batch__"
# Preprocessing an input whose text holds "__raise_<kind>__" raises in the front end (faults.py).
PREPROCESS_FAULT_KINDS = ("stopiteration", "interrupt", "baseexception", "error")
PREPROCESS_FAULT_SPECS = [f"preprocess-{k}:__raise_{k}__" for k in PREPROCESS_FAULT_KINDS]
API_KEY = "test-key-0123456789"


class Gate:
    """The ``hold-batch`` fault's gate (``tests/service/faults.py``): a batch holding
    ``HOLD_BATCH`` waits on the engine's device until ``open()``; ``wait_entered()`` returns
    once it is held. Tests wait on these files, never on a timer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {"TEST_LLAVE_GATE": str(self.path)}

    def wait_entered(self, server: Server, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout  # a hang guard only
        while not (self.path / "entered").exists():
            assert time.monotonic() < deadline, f"the held batch never reached the device:\n{server.log()}"
            time.sleep(0.01)

    def open(self) -> None:
        (self.path / "open").touch()

    def reset(self) -> None:
        """Closed again, for the next held batch (call once the held one has finished)."""
        for name in ("entered", "open"):
            (self.path / name).unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A ``python -m service`` subprocess."""

    def __init__(self, checkpoint: Path, workdir: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        self.readiness: list[int | None] = []  # /ready statuses from the start (None: refused)
        self.gate: Gate | None = None  # set by fixtures whose server can hold a batch
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        full_env = {k: v for k, v in full_env.items() if not k.startswith("LLAVE_")}
        # One front end unless a test asks for more (--api-workers wins over the variable):
        # the tests were written for it, and each front end more costs a start-up per server.
        full_env["LLAVE_API_WORKERS"] = "1"
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        # Faults are injected by a test-only launcher (tests/service/faults.py).
        module = "tests.service.fault_server" if "TEST_LLAVE_FAULTS" in full_env else "service"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                "--model",
                str(checkpoint),
                "--port",
                str(self.port),
                "--data-dir",
                str(workdir / "data"),
                "--log-level",
                "warning",
                *args,
            ],
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    status = client.get(self.url + "/ready").status_code
                except httpx.TransportError:
                    status = None
                self.readiness.append(status)
                if status == 200:
                    return
                time.sleep(0.02)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0, **kwargs)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of the samples of ``name`` whose label set contains ``labels``."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            base = key.split("{", 1)[0]
            if base == name and labels in key:
                total += float(value)
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_server(checkpoint: Path, workdir: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    server = Server(checkpoint, workdir, *args, env=env)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


# Limits small enough to test, large enough for the tiny model's inputs.
MAIN_ARGS = (
    "--max-batch-size", "8",
    "--max-queue", "256",
    "--max-inputs-per-request", "16",
    "--max-images-per-input", "2",
    "--max-image-pixels", "10000",
    "--max-input-tokens", "512",
    "--max-body-bytes", "300000",
    "--preprocess-workers", "2",
)  # fmt: skip


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory):
    """The main server: no API key, fault-injection markers that fail a batch or hold it
    (``server.gate``)."""
    workdir = tmp_path_factory.mktemp("server-main")
    gate = Gate(workdir / "gate")
    srv = start_server(
        tiny_checkpoint,
        workdir,
        *MAIN_ARGS,
        env={
            "TEST_LLAVE_FAULTS": ",".join(
                [f"fail-batch:{FAIL_BATCH}", f"hold-batch:{HOLD_BATCH}", *PREPROCESS_FAULT_SPECS]
            ),
            **gate.env,
        },
    )
    srv.gate = gate
    yield srv
    gate.open()
    srv.stop()


@pytest.fixture(scope="session")
def guarded_server(tiny_checkpoint, tmp_path_factory):
    """API key on, a small queue (8 inputs) to provoke 429s (``server.gate`` holds a batch)."""
    workdir = tmp_path_factory.mktemp("server-guarded")
    gate = Gate(workdir / "gate")
    srv = start_server(
        tiny_checkpoint,
        workdir,
        "--max-queue", "8",
        "--max-inputs-per-request", "8",
        "--max-batch-size", "4",
        "--api-workers", "1",  # one front end, so one queue share: a 429 is certain when full
        env={"LLAVE_API_KEY": API_KEY, "TEST_LLAVE_FAULTS": f"hold-batch:{HOLD_BATCH}", **gate.env},
    )  # fmt: skip
    srv.gate = gate
    yield srv
    gate.open()
    srv.stop()
