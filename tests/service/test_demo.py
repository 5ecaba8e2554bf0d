"""The main command's offline default (`make serve` = `python -m service.demo`), end to end.

A few training steps only: this checks the wiring (data, trainer CLI, evaluation, demo
collection, server, caching), not the demo model's quality, which the README reports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.service.conftest import REPO, free_port


def _start(tmp_path, port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAVE_")}
    env.update(
        {
            "LLAVE_DEMO_DIR": str(tmp_path / "cache"),
            "LLAVE_DATA_DIR": str(tmp_path / "data"),
            "LLAVE_PORT": str(port),
            "LLAVE_DEMO_STEPS": "3",
            "HF_HUB_OFFLINE": "1",
            "LLAVE_LOG_LEVEL": "warning",
            "LLAVE_API_WORKERS": "1",  # one front end, as on the machines the test was timed on
        }
    )
    log = open(tmp_path / f"demo-{port}.log", "w")  # noqa: SIM115 (closed by the caller)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.demo"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    return proc, log


def _wait_ready(proc, url, log_path, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError("demo server not ready:\n" + log_path.read_text())


def _wait_for_line(proc, log_path, text, timeout=60):
    """The demo's watcher prints the addresses just after /ready turns 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = log_path.read_text()
        if text in out:
            return out
        assert proc.poll() is None, out
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in the demo's output:\n" + log_path.read_text())


def _stop(proc, log):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def test_demo_prepares_trains_indexes_serves_and_caches(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, log = _start(tmp_path, port)
    try:
        _wait_ready(proc, url, tmp_path / f"demo-{port}.log")
        out = _wait_for_line(proc, tmp_path / f"demo-{port}.log", "[demo] API docs:")
        assert "Precision@1 on the held-out synthetic eval" in out
        assert "[demo] training:" in out and "curl -s" in out and f"127.0.0.1:{port}/search" in out
        assert f"[demo] search page: {url}/\n" in out and f"{url}/docs" in out
        # Written to a file, progress is plain lines (one per 10% of the steps), never a
        # bar redrawn with carriage returns.
        assert "\r" not in out and "train: 3/3 steps (100%)" in out
        info = httpx.get(url + "/collections/demo").json()
        assert info["count"] == 1600 and info["dim"] == 128
        hits = httpx.post(
            url + "/search", json={"collection": "demo", "query": {"text": "a red circle"}, "k": 3}
        ).json()
        assert len(hits["hits"]) == 3 and {"colour", "shape"} <= set(hits["hits"][0]["metadata"])
    finally:
        _stop(proc, log)
    assert (tmp_path / "cache" / "model" / "config.json").is_file()

    # A second start reuses the trained model and the stored collection.
    port = free_port()
    proc, log = _start(tmp_path, port)
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}", tmp_path / f"demo-{port}.log")
        out = _wait_for_line(proc, tmp_path / f"demo-{port}.log", "[demo] API docs:")
        assert "[demo] training:" not in out
        assert "(0 added now)" in out
    finally:
        _stop(proc, log)
