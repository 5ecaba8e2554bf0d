"""Serving benchmark: the real server under closed-loop concurrent clients, with references.

    python bench/serve.py                       # full CPU run
    python bench/serve.py --quick               # fewer, shorter points (a smoke check)
    python bench/serve.py --gpu-quick           # = --quick --device cuda (bfloat16)
    python bench/serve.py --checkpoint PATH --device cuda --dtype bfloat16 --kinds text,image
    python bench/serve.py --kinds text --inputs-per-request 8   # requests of 8 inputs each
    python bench/serve.py --plot-only bench/results/serve.json   # redraw the chart
    python bench/serve.py --simulate --designs new,old   # SIMULATED GPU (bench/simdevice.py)
    python bench/serve.py --simulate --sim-devices 1,2,4 --concurrency 64,256   # 1, 2, 4 SIMULATED GPUs

What it does, per checkpoint:

1. builds (once, cached in ``--cache-dir``) a random checkpoint with LLaVE-0.5B's real shapes
   (``python -m model.tiny --preset llave-0.5b``), unless ``--checkpoint`` is given;
2. starts the server (``python -m service``) twice on free ports: the batched server with
   the default flags and a naive one with ``--max-batch-size 1``;
3. loads the same checkpoint in this process for the references: the offline limit (the
   embedder's ``embed`` called directly, preprocessing included, sweeping batch sizes up
   to the largest concurrency, best taken), the batch-1 rate, and the latency of one
   direct call with one input;
4. drives each server with N closed-loop clients (httpx; each sends one request with one
   input to ``POST /embed`` and waits for the answer) at each concurrency, for text,
   image and mixed inputs. Each point warms up, then measures a window; throughput is
   inputs completed in the window / window length, latencies are of the requests
   completed in it. During the window it also records the server's CPU use, the mean
   batch size and the device-busy fraction (``/metrics``), and this client's CPU cost;
5. repeats the whole sweep ``--repeats`` times, interleaved (offline, batched and naive
   alternate, concurrency order reversed every other repeat), and reports the median and
   the spread (``(max - min) / median``) of every figure.

Image inputs on CPU: a 0.5B-shaped forward of one 384px image (two crops, 1,485 image
tokens) is too slow on CPU for a sweep, so by default image and mixed runs on CPU use the small ``demo``
preset (``--image-preset``); on CUDA they use the main checkpoint. With
``--image-preset same`` images run on the main checkpoint everywhere.

``--simulate`` (a SIMULATION, labelled so in its output and JSON): the servers load the
model through ``bench.simdevice:load``, whose forward pass is a stand-in calibrated on the
project's H100 run (bench/simdevice.py); each server (the engine-process design with
``--api-workers`` 1 and 2, the old in-process design of ``--old-repo``, variants, and a
bare FastAPI endpoint of the same shape, bench/bare_fastapi.py) gets a c=1 and a c=64
closed loop from one low-overhead client process (``--client raw``); it reports requests/s,
served/offline (offline: the stand-in's nominal best rate), p50 at c=1 against one direct
call, mean batch size and CPU ms per request of every server process by role
(``bench/results/serve-sim[-TAG].json``).
With ``--sim-devices 1,2,4`` the new design also runs with one engine process per
simulated device (``--devices cpu,cpu,...``) and a second table gives, per device count and
concurrency, requests/s, the gain over one device and served / (devices x offline).

Results: a table on stdout, ``bench/results/serve[-TAG].json``, and a PNG chart of
throughput and latency against concurrency (``--plot``, default on when matplotlib is
installed).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import log  # noqa: E402

from service.inference.hardware import dtype_warning  # noqa: E402

KINDS = ("text", "image", "mixed")
_ENV_RE = re.compile(r"^[A-Z_][A-Z0-9_]*=")

# --------------------------------------------------------------------------- the server


@dataclass
class Server:
    """``python -m service`` in a subprocess on a free port."""

    name: str
    checkpoint: Path
    device: str
    dtype: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path = common.DEFAULT_CACHE / "logs"
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    data_dir: Path | None = None
    ready_s: float = float("nan")
    # What runs after the interpreter: ["-m", "service"] by default; the simulated-device
    # launcher (["-m", "bench.simserver", ...]) or, with ``model_args=False``, any command
    # (``{port}`` is replaced), e.g. uvicorn serving bench/bare_fastapi.py.
    launcher: list[str] = field(default_factory=lambda: ["-m", "service"])
    model_args: bool = True
    pythonpath: str | None = None  # put first on PYTHONPATH (e.g. an old tree)
    devices: int = 1  # engine processes (--devices), each with its own (simulated) device

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = common.free_port()
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"llave-bench-{self.name}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        launcher = [a.replace("{port}", str(self.port)) for a in self.launcher]
        cmd = [common.PYTHON, *launcher]
        if self.model_args:
            cmd += [
                "--model", str(self.checkpoint),
                "--host", "127.0.0.1", "--port", str(self.port),
                "--device", self.device, "--dtype", self.dtype,
                "--data-dir", str(self.data_dir),
                "--log-level", "warning",
            ]  # fmt: skip
        cmd += self.args
        self.command = " ".join(cmd[1:])
        logf = open(self.log_dir / f"server-{self.name}.log", "wb")  # noqa: SIM115 (closed with the process)
        self._started = time.perf_counter()
        env = common.offline_env(**self.env)
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath + os.pathsep + env["PYTHONPATH"]
        self.proc = subprocess.Popen(
            cmd, cwd=self.pythonpath or common.REPO, env=env, stdout=logf, stderr=logf
        )
        logf.close()
        atexit.register(self.stop)  # also on SIGTERM (see main) and on errors
        log(f"started server {self.name} (pid {self.proc.pid}): {self.command}")

    async def wait_ready(self, timeout: float = 900.0) -> None:
        import httpx

        assert self.proc is not None
        deadline = time.perf_counter() + timeout
        async with httpx.AsyncClient(timeout=5.0) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    tail = (self.log_dir / f"server-{self.name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.get(self.url + "/ready")
                    if r.status_code == 200:
                        self.ready_s = time.perf_counter() - self._started
                        log(f"server {self.name} ready after {self.ready_s:.1f} s")
                        return
                await asyncio.sleep(0.25)
        raise TimeoutError(f"server {self.name} not ready after {timeout:.0f} s")

    def interrupt(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.interrupt()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


# --------------------------------------------------------------------------- /metrics

_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$")


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_RE.match(line.strip())
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric_delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


# --------------------------------------------------------------------------- closed loop


class _RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.content = body

    def json(self) -> Any:
        import json

        return json.loads(self.content)


class RawClient:
    """A minimal HTTP/1.1 keep-alive client (``--client raw``): ``post`` as httpx's, far less CPU.

    httpx spends about 2 ms of CPU per request; on a 2-core machine, where the client shares
    the cores with the server, that alone caps a closed loop below the server's rate. This
    writes the request bytes by hand and reads the status line, the headers and a
    Content-Length (or chunked) body; one connection per concurrent request, reused.
    """

    def __init__(self, url: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, content: bytes, headers: dict[str, str]) -> _RawResponse:
        conn = self._free.pop() if self._free else await asyncio.open_connection(self.host, self.port)
        reader, writer = conn
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(content)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        try:
            writer.write(head.encode("latin-1") + content)
            line = await reader.readline()
            if not line:
                raise ConnectionError("the server closed the connection")
            status = int(line.split()[1])
            hdrs: dict[str, str] = {}
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                hdrs[k.strip().lower()] = v.strip()
            if "content-length" in hdrs:
                body = await reader.readexactly(int(hdrs["content-length"]))
            elif hdrs.get("transfer-encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int((await reader.readline()).split(b";")[0], 16)
                    chunk = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    chunks.append(chunk[:-2])
                body = b"".join(chunks)
            else:
                body = await reader.read()
                hdrs["connection"] = "close"
        except BaseException:
            writer.close()
            raise
        if hdrs.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._free.append(conn)
        return _RawResponse(status, hdrs, body)

    async def aclose(self) -> None:
        for _, writer in self._free:
            writer.close()
        self._free.clear()


Record = tuple[float, float, int, float, float, float]  # sent, done, inputs, preprocess/queue/inference ms


def _worker_factory(
    client: Any,
    bodies: list[bytes],
    records: list[Record],
    errors: dict[int, int],
    clock: Any,
    per_body: int = 1,
) -> Any:
    """A closed-loop client: send one request, wait for the answer, repeat until cancelled.

    Each body carries ``per_body`` inputs."""
    headers = {"content-type": "application/json"}
    counter = iter(range(1 << 62))
    state = {"checked": False}

    async def worker() -> None:
        while True:
            body = bodies[next(counter) % len(bodies)]
            t0 = clock()
            r = await client.post("/embed", content=body, headers=headers)
            t1 = clock()
            if r.status_code != 200:
                errors[r.status_code] = errors.get(r.status_code, 0) + 1
                await asyncio.sleep(0.05)
                continue
            if not state["checked"]:  # parse one answer per point; the rest only by status
                state["checked"] = True
                vec = r.json()["embeddings"][0]
                assert len(vec) > 0 and abs(sum(x * x for x in vec) - 1.0) < 1e-2, "not a unit vector"
            h = r.headers
            records.append(
                (
                    t0,
                    t1,
                    per_body,
                    float(h.get("x-llave-preprocess-ms", "nan")),
                    float(h.get("x-llave-queue-ms", "nan")),
                    float(h.get("x-llave-inference-ms", "nan")),
                )
            )

    return worker


async def closed_loop(
    server: Server,
    bodies: list[bytes],
    concurrency: int,
    *,
    duration: float,
    warmup: float,
    min_rounds: float,
    max_window: float,
    procs: int = 1,
    per_body: int = 1,
    client_kind: str = "httpx",
) -> dict[str, Any]:
    """N workers, each sending one request and waiting; measures one window in steady state.

    With ``procs > 1`` the workers are spread over that many client processes (a single
    Python client tops out at a few thousand requests/s, below a GPU server) and the
    window is fixed in time: ``warmup`` then ``duration`` seconds.
    """
    import httpx

    if procs > 1 and concurrency >= procs:
        return await _closed_loop_procs(
            server, bodies, concurrency, duration=duration, warmup=warmup, procs=procs, per_body=per_body,
            client_kind=client_kind,
        )  # fmt: skip
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    records: list[Record] = []
    errors: dict[int, int] = {}

    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=httpx.Timeout(900.0)) as client:
        poster = RawClient(server.url) if client_kind == "raw" else client
        worker = _worker_factory(poster, bodies, records, errors, time.perf_counter, per_body)

        async def metrics() -> dict[str, float]:
            return parse_metrics((await client.get("/metrics")).text)

        def check(tasks: list[asyncio.Task[None]]) -> None:
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception():
                    raise t.exception()  # type: ignore[misc]

        started = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        try:
            # Warm-up: at least `warmup` seconds and about one answer per worker.
            while True:
                await asyncio.sleep(0.05)
                elapsed = time.perf_counter() - started
                if (elapsed >= warmup and len(records) >= concurrency) or elapsed >= warmup + max_window:
                    break
                check(tasks)
            m0 = await metrics()
            foreign = common.ForeignLoad([server.proc.pid])  # type: ignore[union-attr]
            cpu0 = common.cpu_seconds(server.proc.pid)  # type: ignore[union-attr]
            tree0 = common.tree_cpu(server.proc.pid)  # type: ignore[union-attr]
            client0 = time.process_time()
            w0 = time.perf_counter()
            slices: list[tuple[float, float]] = []  # (end time, foreign cores in the second before)
            slice_load = common.ForeignLoad([server.proc.pid])  # type: ignore[union-attr]
            while True:
                await asyncio.sleep(0.05)
                if slice_load.elapsed() >= 1.0:
                    slices.append((time.perf_counter(), slice_load.cores()))
                    slice_load.start()
                elapsed = time.perf_counter() - w0
                done = sum(1 for r in records if r[1] >= w0)
                if (elapsed >= duration and done >= min_rounds * concurrency) or elapsed >= max_window:
                    break
                check(tasks)
            w1 = time.perf_counter()
            client_cpu = time.process_time() - client0
            cpu1 = common.cpu_seconds(server.proc.pid)  # type: ignore[union-attr]
            tree1 = common.tree_cpu(server.proc.pid)  # type: ignore[union-attr]
            foreign_cores = foreign.cores()
            m1 = await metrics()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(poster, RawClient):
                await poster.aclose()
        await _drain(client)
    point = _point(concurrency, records, errors, w0, w1, m0, m1, cpu1 - cpu0, client_cpu, foreign_cores)
    point.update(_quiet_slices(records, w0, slices))
    point["processes"] = common.tree_cpu_delta(tree0, tree1)
    return point


def _quiet_slices(
    records: list[Record], w0: float, slices: list[tuple[float, float]], threshold: float = 0.3
) -> dict[str, Any]:
    """Throughput over the seconds of the window in which other processes were quiet.

    Only meaningful when a second holds many completions (answers come in bursts of a
    batch); reported next to the plain figure, never instead of it.
    """
    quiet_s, done = 0.0, 0
    start = w0
    for end, cores in slices:
        if cores < threshold:
            quiet_s += end - start
            done += sum(r[2] for r in records if start <= r[1] < end)
        start = end
    window = slices[-1][0] - w0 if slices else 0.0
    return {
        "quiet_fraction": quiet_s / window if window else float("nan"),
        "throughput_quiet": done / quiet_s if quiet_s >= 3.0 else float("nan"),
    }


async def _drain(client: Any) -> None:
    """Let the server finish what cancelled clients left on the device before the next point."""
    for _ in range(600):
        q = parse_metrics((await client.get("/metrics")).text).get("llave_queue_inputs", 0.0)
        if q == 0:
            return
        await asyncio.sleep(0.1)


def _client_process(
    url: str,
    bodies: list[bytes],
    workers: int,
    t_start: float,
    w0: float,
    w1: float,
    per_body: int = 1,
    client_kind: str = "httpx",
) -> dict[str, Any]:
    """One client process of ``_closed_loop_procs`` (epoch clock, shared with the parent)."""
    import httpx

    async def main() -> dict[str, Any]:
        records: list[Record] = []
        errors: dict[int, int] = {}
        limits = httpx.Limits(max_connections=workers + 4, max_keepalive_connections=workers + 4)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(900.0)) as client:
            poster = RawClient(url) if client_kind == "raw" else client
            worker = _worker_factory(poster, bodies, records, errors, time.time, per_body)
            await asyncio.sleep(max(0.0, t_start - time.time()))
            tasks = [asyncio.create_task(worker()) for _ in range(workers)]
            await asyncio.sleep(max(0.0, w0 - time.time()))
            cpu0 = time.process_time()
            await asyncio.sleep(max(0.0, w1 - time.time()))
            cpu = time.process_time() - cpu0
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return {"records": records, "errors": errors, "cpu": cpu}

    return asyncio.run(main())


async def _closed_loop_procs(
    server: Server,
    bodies: list[bytes],
    concurrency: int,
    *,
    duration: float,
    warmup: float,
    procs: int,
    per_body: int = 1,
    client_kind: str = "httpx",
) -> dict[str, Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import httpx

    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    t_start = time.time() + 3.0  # the client processes need a moment to start
    w0, w1 = t_start + warmup, t_start + warmup + duration
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            loop.run_in_executor(
                pool, _client_process, server.url, bodies, n, t_start, w0, w1, per_body, client_kind
            )
            for n in shares
            if n
        ]
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as client:
            await asyncio.sleep(max(0.0, w0 - time.time()))
            m0 = parse_metrics((await client.get("/metrics")).text)
            foreign = common.ForeignLoad([server.proc.pid])  # type: ignore[union-attr]
            cpu0 = common.cpu_seconds(server.proc.pid)  # type: ignore[union-attr]
            tree0 = common.tree_cpu(server.proc.pid)  # type: ignore[union-attr]
            await asyncio.sleep(max(0.0, w1 - time.time()))
            cpu1 = common.cpu_seconds(server.proc.pid)  # type: ignore[union-attr]
            tree1 = common.tree_cpu(server.proc.pid)  # type: ignore[union-attr]
            foreign_cores = foreign.cores()  # the client processes count as "foreign" here
            m1 = parse_metrics((await client.get("/metrics")).text)
            parts = await asyncio.gather(*futures)
            await _drain(client)
    records = [r for part in parts for r in part["records"]]
    errors: dict[int, int] = {}
    for part in parts:
        for code, n in part["errors"].items():
            errors[code] = errors.get(code, 0) + n
    client_cpu = sum(part["cpu"] for part in parts)
    point = _point(concurrency, records, errors, w0, w1, m0, m1, cpu1 - cpu0, client_cpu, foreign_cores)
    point["client_procs"] = procs
    point["processes"] = common.tree_cpu_delta(tree0, tree1)
    return point


def _point(
    concurrency: int,
    records: list[Record],
    errors: dict[int, int],
    w0: float,
    w1: float,
    m0: dict[str, float],
    m1: dict[str, float],
    server_cpu: float,
    client_cpu: float,
    foreign_cores: float,
) -> dict[str, Any]:
    window = [r for r in records if w0 <= r[1] <= w1]
    lat = [(r[1] - r[0]) * 1000.0 for r in window]
    span = w1 - w0
    n = sum(r[2] for r in window)
    batches = metric_delta(m0, m1, "llave_batch_size_count")
    infer_s = metric_delta(m0, m1, 'llave_stage_seconds_sum{stage="inference"}')

    def per_batch(key: str) -> float:
        return metric_delta(m0, m1, key) / batches if batches else float("nan")

    def mean_header(i: int) -> float:
        vals = [r[i] for r in window if r[i] == r[i]]
        return sum(vals) / len(vals) if vals else float("nan")

    return {
        "concurrency": concurrency,
        "requests": len(window),
        "window_s": span,
        "throughput": n / span if span > 0 else float("nan"),
        "p50_ms": common.percentile(lat, 50),
        "p95_ms": common.percentile(lat, 95),
        "p99_ms": common.percentile(lat, 99),
        "mean_ms": sum(lat) / len(lat) if lat else float("nan"),
        "errors": errors,
        "batches": batches,
        "mean_batch_size": per_batch("llave_batch_size_sum"),
        "mean_batch_tokens": per_batch("llave_batch_tokens_sum"),
        "ms_per_batch": infer_s / batches * 1000.0 if batches else float("nan"),
        "device_busy": infer_s / span if span > 0 else float("nan"),
        "server_cpu_cores": server_cpu / span if span > 0 else float("nan"),
        "client_cpu_cores": client_cpu / span if span > 0 else float("nan"),
        "foreign_cpu_cores": foreign_cores,
        "header_preprocess_ms": mean_header(3),
        "header_queue_ms": mean_header(4),
        "header_inference_ms": mean_header(5),
    }


# --------------------------------------------------------------------------- offline references


class Offline:
    """The same checkpoint loaded in this process: the references without HTTP."""

    def __init__(self, checkpoint: Path, device: str, dtype: str) -> None:
        from model import load_embedder

        started = time.perf_counter()
        self.embedder = load_embedder(str(checkpoint), device=device, dtype=dtype)
        self.load_s = time.perf_counter() - started
        self.embedder.embed([{"text": "warm up"}])

    def sweep(
        self, inputs: list[dict[str, Any]], batch_sizes: list[int], duration: float, before: Any = None
    ) -> list[dict[str, Any]]:
        """Inputs/s of ``embed`` (preprocess + forward + postprocess) at each batch size."""
        emb = self.embedder
        rows = []
        offset = 0
        for b in batch_sizes:

            def chunk(b: int = b) -> list[dict[str, Any]]:
                nonlocal offset
                out = [inputs[(offset + i) % len(inputs)] for i in range(b)]
                offset += b
                return out

            if before is not None:
                before()
            emb.embed(chunk(), batch_size=b)  # warm this shape
            foreign = common.ForeignLoad()
            times = []
            t_start = time.perf_counter()
            while time.perf_counter() - t_start < duration or len(times) < 2:
                batch = chunk()
                t0 = time.perf_counter()
                emb.embed(batch, batch_size=b)
                times.append(time.perf_counter() - t0)
            total = sum(times)
            rows.append(
                {
                    "batch_size": b,
                    "calls": len(times),
                    "throughput": b * len(times) / total,
                    "ms_per_call_p50": common.percentile([t * 1000 for t in times], 50),
                    "foreign_cpu_cores": foreign.cores(),
                }
            )
        return rows


# --------------------------------------------------------------------------- inputs


def make_inputs(
    kind: str, checkpoint: Path, n: int, text_tokens: int, image_size: tuple[int, int]
) -> list[dict[str, Any]]:
    if kind == "text":
        return [{"text": t} for t in common.make_texts(checkpoint, n, text_tokens)]
    if kind == "image":
        return [{"image": b} for b in common.make_images(n, image_size)]
    texts = common.make_texts(checkpoint, n, text_tokens, seed=1)
    images = common.make_images(n, image_size, seed=1)
    return [{"text": texts[i]} if i % 2 == 0 else {"image": images[i]} for i in range(n)]


# --------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument(
        "--checkpoint", type=Path, help="checkpoint to serve (default: a cached random --preset one)"
    )
    g.add_argument(
        "--preset", default="llave-0.5b", help="model.tiny preset built when --checkpoint is absent"
    )
    g.add_argument("--image-preset", default="auto",
                   help="preset for image/mixed runs: auto (demo on CPU, the main checkpoint on CUDA), "
                        "same (the main checkpoint), or a model.tiny preset")  # fmt: skip
    g.add_argument(
        "--cache-dir", type=Path, default=common.DEFAULT_CACHE, help="where built checkpoints are cached"
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    g.add_argument(
        "--dtype",
        default="auto",
        help="auto (the server's choice: bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16",
    )
    g = p.add_argument_group("load")
    g.add_argument("--kinds", default="text,image,mixed", help="comma-separated: text, image, mixed")
    g.add_argument("--concurrency", default="1,8,32,64", help="comma-separated client counts")
    g.add_argument("--duration", type=float, default=20.0, help="seconds measured per point (at least)")
    g.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per point (at least)")
    g.add_argument(
        "--min-rounds",
        type=float,
        default=3.0,
        help="a batched point measures until every client got about this many answers",
    )
    g.add_argument("--max-window", type=float, default=120.0, help="upper bound of one point's window (s)")
    g.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the whole sweep")
    g.add_argument(
        "--naive-kinds", default="text", help="kinds also run against the --max-batch-size 1 server"
    )
    g.add_argument(
        "--naive-concurrency",
        default="",
        help="concurrencies for the naive/variant servers (default: --concurrency)",
    )
    g.add_argument(
        "--offline-batches",
        default="",
        help="offline batch sizes (default: 1, 2, 4, ... up to the top concurrency)",
    )
    g.add_argument("--offline-duration", type=float, default=4.0, help="seconds per offline batch size")
    g.add_argument(
        "--inputs-per-request",
        type=int,
        default=1,
        help="inputs in each request's body (throughput still counts inputs)",
    )
    g.add_argument("--text-tokens", type=int, default=40, help="tokens per text (before the ChatML template)")
    g.add_argument("--image-size", default="384x384", help="WxH of the JPEG test images")
    g.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each point, wait up to this many seconds for other processes on the "
        "machine to use under --quiet-threshold cores (shared machines; 0: never wait)",
    )
    g.add_argument("--quiet-threshold", type=float, default=0.3, help="cores others may use when we start")
    g.add_argument(
        "--client-procs",
        type=int,
        default=0,
        help="client processes (>1: spread the clients, fixed-time windows). 0 (default): one "
        "per 16 clients, at most 8 (one asyncio client process with 64 connections spends "
        "enough CPU per request to become the bottleneck against a fast server; bench/README.md)",
    )
    g = p.add_argument_group("server")
    g.add_argument(
        "--server-arg", action="append", default=[], help="extra flag for the batched server (repeatable)"
    )
    g.add_argument(
        "--server-env", action="append", default=[], help="KEY=VALUE for both servers (repeatable)"
    )
    g.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME='ENV=VALUE ... --flag value ...': one more server, run like the naive one "
        "(e.g. t1='OMP_NUM_THREADS=1'); repeatable",
    )
    g = p.add_argument_group("mode")
    g.add_argument("--quick", action="store_true", help="1 repeat, short points (a smoke check)")
    g.add_argument("--gpu-quick", action="store_true", help="--quick on cuda/bfloat16, text and image")
    g.add_argument("--tag", default="", help="suffix of the results file (serve-TAG.json)")
    g.add_argument("--no-plot", action="store_true", help="do not draw the PNG chart")
    g.add_argument("--plot-only", type=Path, help="redraw the chart from a results JSON and exit")
    g = p.add_argument_group("simulated device (--simulate; bench/simdevice.py)")
    g.add_argument("--simulate", action="store_true",
                   help="SIMULATION: serve with a stand-in forward that behaves like an H100's "
                        "(GIL held for the launches, then a sleep); report served/offline, p50 at "
                        "c=1, requests/s at c=64, batch sizes and CPU per process, against a bare "
                        "FastAPI endpoint")  # fmt: skip
    g.add_argument("--designs", default="new",
                   help="comma-separated: new (engine process, python -m bench.simserver), old (the "
                        "in-process engine of --old-repo), inproc (this tree's server with the "
                        "in-process hook, for a tree where it still exists)")  # fmt: skip
    g.add_argument("--old-repo", type=Path, default=Path("/tmp/old-design"),
                   help="a checkout of the old design (git worktree add /tmp/old-design 3b9179b)")  # fmt: skip
    g.add_argument("--api-workers", default="1,2", help="--api-workers values for the new design")
    g.add_argument("--sim-devices", default="1",
                   help="comma-separated simulated device counts for the new design: one engine "
                        "process per device (--devices cpu,cpu,...), each with its own stand-in")  # fmt: skip
    g.add_argument("--sim-profile", default="h100", help="h100 (flat in batch size) or linear (a CPU's)")
    g.add_argument("--no-bare", action="store_true", help="skip the bare FastAPI reference")
    g.add_argument("--c1-duration", type=float, default=5.0, help="seconds measured at c=1")
    g.add_argument("--client", default="raw", choices=["raw", "httpx"],
                   help="--simulate's client: raw (a minimal keep-alive HTTP/1.1 client, little CPU) "
                        "or httpx (as the CPU/GPU runs)")  # fmt: skip
    args = p.parse_args(argv)
    if args.simulate:
        explicit = set(sys.argv[1:] if argv is None else argv)
        for flag, name, value in (
            ("--concurrency", "concurrency", "1,64"),
            ("--duration", "duration", 12.0),
            ("--warmup", "warmup", 3.0),
            ("--min-rounds", "min_rounds", 1.0),
            ("--max-window", "max_window", 30.0),
            ("--quiet-wait", "quiet_wait", 10.0),
            ("--offline-duration", "offline_duration", 1.0),
        ):
            if not any(a == flag or a.startswith(flag + "=") for a in explicit):
                setattr(args, name, value)
    if args.gpu_quick:
        args.quick = True
        args.device = "cuda" if args.device == "cpu" else args.device
    if args.quick:
        on_cuda = args.device.startswith("cuda")
        explicit = set(sys.argv[1:] if argv is None else argv)

        def default(flag: str, name: str, value: Any) -> None:
            if not any(a == flag or a.startswith(flag + "=") for a in explicit):
                setattr(args, name, value)

        default("--repeats", "repeats", 1)
        default("--duration", "duration", 4.0)
        default("--warmup", "warmup", 1.0)
        default("--min-rounds", "min_rounds", 1.0)
        default("--offline-duration", "offline_duration", 0.5)
        default("--offline-batches", "offline_batches", "1,4,16,64" if on_cuda else "1,4,16")
        default("--kinds", "kinds", "text,image")
        default("--naive-concurrency", "naive_concurrency", "1,64")
        default("--max-window", "max_window", 30.0)
        default("--quiet-wait", "quiet_wait", 0.0)
        if not any(a.startswith("--warmup-tokens") for a in args.server_arg):
            args.server_arg = [*args.server_arg, "--warmup-tokens=64"]  # a shorter server warm-up
        if on_cuda:
            default("--client-procs", "client_procs", 8)
    return args


def batch_sizes_for(max_concurrency: int) -> list[int]:
    sizes, b = [], 1
    while b < max_concurrency:
        sizes.append(b)
        b *= 2
    return [*sizes, max_concurrency]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    kinds = [k for k in args.kinds.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            raise SystemExit(f"unknown kind {k!r}; choose from {KINDS}")
    naive_kinds = {k for k in args.naive_kinds.split(",") if k}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    w, h = (int(x) for x in args.image_size.lower().split("x"))
    on_cuda = args.device.startswith("cuda")

    main_ckpt = args.checkpoint or common.ensure_checkpoint(args.preset, args.cache_dir)
    image_preset = args.image_preset
    if image_preset == "auto":
        image_preset = "same" if on_cuda or args.checkpoint else "demo"
    image_ckpt = (
        main_ckpt if image_preset == "same" else common.ensure_checkpoint(image_preset, args.cache_dir)
    )
    groups: dict[Path, list[str]] = {}
    for k in kinds:
        groups.setdefault(main_ckpt if k == "text" else image_ckpt, []).append(k)

    env = dict(kv.split("=", 1) for kv in args.server_env)
    result: dict[str, Any] = {
        "benchmark": "serve",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": "python bench/serve.py " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "groups": [],
    }
    import torch  # after the checkpoints are built (their builds run in subprocesses)

    if args.dtype == "auto":  # the server's own rule, so that servers and references agree
        from model.checkpoint import resolve_dtype

        args.dtype = str(resolve_dtype("auto", torch.device(args.device))).removeprefix("torch.")
        result["args"]["dtype"] = args.dtype
    slow_dtype = dtype_warning(args.device, args.dtype)
    if slow_dtype is not None:
        log(f"WARNING: {slow_dtype}")

    for ckpt, group_kinds in groups.items():
        log(f"checkpoint {ckpt}: kinds {group_kinds}")
        servers = {"batched": Server("batched", ckpt, args.device, args.dtype, list(args.server_arg), env)}
        if naive_kinds & set(group_kinds):
            servers["naive"] = Server("naive", ckpt, args.device, args.dtype, ["--max-batch-size", "1"], env)
            for spec in args.variant:
                name, _, rest = spec.partition("=")
                v_env = {k: v for k, _, v in (t.partition("=") for t in rest.split() if _ENV_RE.match(t))}
                v_args = [t for t in rest.split() if not _ENV_RE.match(t)]
                servers[name] = Server(name, ckpt, args.device, args.dtype, v_args, {**env, **v_env})
        group: dict[str, Any] = {"checkpoint": str(ckpt), "kinds": group_kinds, "points": [], "offline": []}
        try:
            for s in servers.values():
                s.start()
            await asyncio.gather(*(s.wait_ready() for s in servers.values()))
            group["servers"] = {n: {"command": s.command, "ready_s": s.ready_s} for n, s in servers.items()}
            offline = Offline(ckpt, args.device, args.dtype)
            group["offline_load_s"] = offline.load_s
            group["torch_threads"] = torch.get_num_threads()
            inputs = {
                k: make_inputs(k, ckpt, max(2 * max(concurrencies), 64), args.text_tokens, (w, h))
                for k in group_kinds
            }
            costs = {k: [offline.embedder.preprocess(x).cost for x in v] for k, v in inputs.items()}
            group["tokens_per_input"] = {k: sum(c) / len(c) for k, c in costs.items()}
            per = args.inputs_per_request
            bodies = {
                k: [common_json({"inputs": v[i : i + per]}) for i in range(0, len(v) - per + 1, per)]
                for k, v in inputs.items()
            }
            group["inputs_per_request"] = per
            for rep in range(args.repeats):
                for kind in group_kinds if rep % 2 == 0 else group_kinds[::-1]:
                    log(f"repeat {rep + 1}/{args.repeats}, {kind}: offline sweep")
                    sizes = (
                        [int(b) for b in args.offline_batches.split(",")]
                        if args.offline_batches
                        else batch_sizes_for(max(concurrencies))
                    )
                    for row in offline.sweep(
                        inputs[kind], sizes, args.offline_duration, lambda: quiet(args, [])
                    ):
                        group["offline"].append({"kind": kind, "repeat": rep, **row})
                    names = [n for n in servers if n == "batched" or kind in naive_kinds]
                    if rep % 2:
                        names.reverse()
                    for name in names:
                        server = servers[name]
                        cs = concurrencies
                        if name != "batched" and args.naive_concurrency:
                            cs = [int(c) for c in args.naive_concurrency.split(",")]
                        order = cs if rep % 2 == 0 else cs[::-1]
                        for c in order:
                            quiet(args, [s.proc.pid for s in servers.values() if s.proc])
                            point = await closed_loop(
                                server,
                                bodies[kind],
                                c,
                                duration=args.duration,
                                warmup=args.warmup,
                                min_rounds=args.min_rounds if name == "batched" else 0.0,
                                max_window=args.max_window,
                                procs=args.client_procs or max(1, min(8, c // 16)),
                                per_body=per,
                            )
                            point.update(kind=kind, server=name, repeat=rep)
                            group["points"].append(point)
                            log(
                                f"  {kind:5s} {name:7s} c={c:3d}: {point['throughput']:8.2f} inputs/s, "
                                f"p50 {point['p50_ms']:8.1f} ms, p99 {point['p99_ms']:8.1f} ms, "
                                f"batch {point['mean_batch_size']:.1f}, busy {point['device_busy']:.2f}, "
                                f"server cpu {point['server_cpu_cores']:.2f}, others {point['foreign_cpu_cores']:.2f}"
                            )
            del offline
        finally:
            for s in servers.values():
                s.interrupt()  # all at once: each takes a few seconds to shut down
            for s in servers.values():
                s.stop()
        result["groups"].append(group)
    result["machine"] = common.machine_info()
    result["summary"] = summarise(result)
    return result


def quiet(args: argparse.Namespace, pids: list[int]) -> None:
    if args.quiet_wait > 0:
        started = time.perf_counter()
        cores = common.wait_for_quiet(pids, threshold=args.quiet_threshold, max_wait=args.quiet_wait)
        waited = time.perf_counter() - started
        if waited > 2:
            log(f"waited {waited:.0f} s for the machine to calm down (others now use {cores:.2f} cores)")


def common_json(obj: Any) -> bytes:
    import json

    return json.dumps(obj, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- simulated device


def _checkpoint_dim(checkpoint: Path) -> int:
    import json

    cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    return int(cfg.get("text_config", {}).get("hidden_size") or cfg["hidden_size"])


def sim_offline(dim: int, sizes: list[int], duration: float) -> list[dict[str, Any]]:
    """The stand-in forward called directly (plus the real postprocess), per batch size."""
    import simdevice

    from model.embedder import Embedder

    forward = simdevice.SimulatedForward(dim)
    rows = []
    for b in sizes:
        Embedder.postprocess(forward(b))  # warm
        times = []
        started = time.perf_counter()
        while time.perf_counter() - started < duration or len(times) < 3:
            t0 = time.perf_counter()
            Embedder.postprocess(forward(b))
            times.append(time.perf_counter() - t0)
        rows.append(
            {
                "batch_size": b,
                "calls": len(times),
                "throughput": b * len(times) / sum(times),
                "ms_per_call_p50": common.percentile([t * 1000 for t in times], 50),
            }
        )
    return rows


def _sim_servers(args: argparse.Namespace, ckpt: Path, env: dict[str, str], dim: int) -> list[Server]:
    cmax = max(int(c) for c in args.concurrency.split(","))
    # Batches of at most 64: the stand-in is calibrated up to 64 (beyond, its cost is extrapolated).
    base = ["--max-batch-size", str(min(cmax, 64)), "--warmup-tokens", "64", "--gil-switch-interval-ms", "0.1",
            *args.server_arg]  # fmt: skip
    sim = ["-m", "bench.simserver"]
    servers: list[Server] = []
    for design in [d for d in args.designs.split(",") if d]:
        if design == "old":
            if not (args.old_repo / "service").is_dir():
                raise SystemExit(
                    f"--old-repo {args.old_repo}: no service/ there (git worktree add ... 3b9179b)"
                )
            servers.append(Server("old", ckpt, "cpu", "float32", list(base), dict(env),
                                  launcher=[*sim, "--old-design"], pythonpath=str(args.old_repo)))  # fmt: skip
        elif design == "inproc":
            servers.append(Server("inproc", ckpt, "cpu", "float32", list(base), dict(env),
                                  launcher=[*sim, "--old-design"]))  # fmt: skip
        elif design == "new":
            counts = [int(x) for x in args.sim_devices.split(",") if x]
            for w in [int(x) for x in args.api_workers.split(",") if x]:
                for d in counts:
                    name = f"new-w{w}" + (f"-d{d}" if counts != [1] else "")
                    # Several devices: one engine per device (--devices cpu,cpu,...), each with
                    # its own stand-in; one is the single engine on --device as before.
                    many = ["--devices", ",".join(["cpu"] * d)] if d > 1 else []
                    servers.append(Server(name, ckpt, "auto" if many else "cpu", "float32",
                                          [*base, "--api-workers", str(w), *many], dict(env),
                                          launcher=list(sim), devices=d))  # fmt: skip
        else:
            raise SystemExit(f"unknown design {design!r}: old, inproc, new")
    for spec in args.variant:  # NAME='ENV=VALUE --flag value': a variant of the first server
        name, _, rest = spec.partition("=")
        first = servers[0]
        v_env = {k: v for k, _, v in (t.partition("=") for t in rest.split() if _ENV_RE.match(t))}
        v_args = [t for t in rest.split() if not _ENV_RE.match(t)]
        servers.append(Server(name, ckpt, "cpu", "float32", [*first.args, *v_args], {**first.env, **v_env},
                              launcher=list(first.launcher), pythonpath=first.pythonpath))  # fmt: skip
    if not args.no_bare:
        uvicorn = ["-m", "uvicorn", "bench.bare_fastapi:app", "--host", "127.0.0.1", "--port", "{port}",
                   "--log-level", "warning"]  # fmt: skip
        servers.append(Server("bare-fastapi", ckpt, "cpu", "float32", [], {"LLAVE_BARE_DIM": str(dim)},
                              launcher=uvicorn, model_args=False))  # fmt: skip
    return servers


async def run_simulated(args: argparse.Namespace) -> dict[str, Any]:
    """Each server in turn: c=1 and c=64 closed-loop points against the simulated device."""
    import simdevice

    os.environ["LLAVE_SIM_PROFILE"] = args.sim_profile  # the offline stand-in here, too
    profile = simdevice.profile_from_env()
    ckpt = args.checkpoint or common.ensure_checkpoint(args.preset, args.cache_dir)
    dim = _checkpoint_dim(ckpt)
    env = {"LLAVE_SIM_PROFILE": args.sim_profile, **dict(kv.split("=", 1) for kv in args.server_env)}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    texts = common.make_texts(ckpt, max(2 * max(concurrencies), 64), args.text_tokens)
    bodies = [common_json({"inputs": [{"text": t}]}) for t in texts]
    result: dict[str, Any] = {
        "benchmark": "serve-simulated",
        "SIMULATION": "the device is simulated (bench/simdevice.py): no model forward runs",
        "profile": profile.describe(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": "python bench/serve.py " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checkpoint": str(ckpt),
        "dim": dim,
        "servers": [],
    }
    sizes = (
        [int(b) for b in args.offline_batches.split(",")]
        if args.offline_batches
        else batch_sizes_for(max(concurrencies))
    )
    log("offline: the stand-in forward called directly")
    result["offline"] = sim_offline(dim, sizes, args.offline_duration)
    best_n = max(sizes, key=lambda n: n / profile.total_ms(n))
    result["nominal"] = {  # what the stand-in is set to take (measured: slower when the CPU is shared)
        "offline_limit": best_n / profile.total_ms(best_n) * 1000.0,
        "offline_best_batch": best_n,
        "direct_latency_ms": profile.total_ms(1),
    }
    for server in _sim_servers(args, ckpt, env, dim):
        entry: dict[str, Any] = {
            "name": server.name,
            "devices": server.devices,
            "env": server.env,
            "points": [],
        }
        try:
            server.start()
            entry["command"] = server.command
            await server.wait_ready()
            for c in concurrencies:
                quiet(args, [server.proc.pid] if server.proc else [])
                point = await closed_loop(
                    server,
                    bodies,
                    c,
                    duration=args.c1_duration if c == 1 else args.duration,
                    warmup=args.warmup,
                    min_rounds=args.min_rounds,
                    max_window=args.max_window,
                    procs=args.client_procs or 1,
                    client_kind=args.client,
                )
                point["server"] = server.name
                entry["points"].append(point)
                per_req = ", ".join(
                    f"{p['role']} {p['cpu_s'] * 1000 / max(point['requests'], 1):.2f}"
                    for p in point["processes"]
                    if p["cpu_s"] > 0
                )
                log(
                    f"  SIMULATED {server.name:12s} c={c:3d}: {point['throughput']:8.1f} req/s, "
                    f"p50 {point['p50_ms']:7.1f} ms, p99 {point['p99_ms']:7.1f} ms, "
                    f"batch {point['mean_batch_size']:.1f}, CPU ms/request: {per_req}, "
                    f"others {point['foreign_cpu_cores']:.2f} cores"
                )
        except Exception as exc:  # one server failing (e.g. a design not landed) skips it
            log(f"server {server.name} failed: {exc}")
            entry["error"] = str(exc)[-2000:]
        finally:
            server.stop()
        result["servers"].append(entry)
    result["machine"] = common.machine_info()
    result["summary"] = sim_summary(result)
    return result


def sim_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the stand-in's nominal timing (the simulated GPU's speed: a GPU is not
    slowed by other processes' CPU use); the measured offline figures are reported beside."""
    measured = max(result["offline"], key=lambda r: r["throughput"])
    measured_direct = next(
        (r["ms_per_call_p50"] for r in result["offline"] if r["batch_size"] == 1), float("nan")
    )
    offline = {
        "throughput": result["nominal"]["offline_limit"],
        "batch_size": result["nominal"]["offline_best_batch"],
    }
    direct = result["nominal"]["direct_latency_ms"]
    rows = []
    bare = next(
        (p["throughput"] for e in result["servers"] if e["name"] == "bare-fastapi" for p in e["points"]
         if p["concurrency"] == max(q["concurrency"] for q in e["points"])),
        float("nan"),
    )  # fmt: skip
    for e in result["servers"]:
        if not e["points"]:
            rows.append({"server": e["name"], "error": e.get("error", "")[:200]})
            continue
        top = max(e["points"], key=lambda p: p["concurrency"])
        one = next((p for p in e["points"] if p["concurrency"] == 1), None)
        n = max(top["requests"], 1)
        procs = [
            {"role": p["role"], "pid": p["pid"], "cpu_ms_per_request": p["cpu_s"] * 1000 / n}
            for p in top["processes"]
        ]
        rows.append(
            {
                "server": e["name"],
                "concurrency": top["concurrency"],
                "requests_per_s": top["throughput"],
                "served_over_offline": top["throughput"] / offline["throughput"],
                "served_over_bare": top["throughput"] / bare if bare == bare else float("nan"),
                "p50_ms": top["p50_ms"],
                "p99_ms": top["p99_ms"],
                "mean_batch_size": top["mean_batch_size"],
                "p50_c1_ms": one["p50_ms"] if one else float("nan"),
                "p50_c1_over_direct": one["p50_ms"] / direct if one else float("nan"),
                # Against the stand-in as measured here in the same run (both slowed alike
                # when other processes take the CPU):
                "served_over_offline_measured": top["throughput"] / measured["throughput"],
                "p50_c1_over_direct_measured": one["p50_ms"] / measured_direct if one else float("nan"),
                "server_cpu_ms_per_request": sum(p["cpu_ms_per_request"] for p in procs),
                "cpu_ms_per_request_by_process": "; ".join(
                    f"{p['role']} {p['cpu_ms_per_request']:.2f}" for p in procs if p["cpu_ms_per_request"] > 0
                ),
                "processes": procs,
                "client_cpu_cores": top["client_cpu_cores"],
                "foreign_cpu_cores": top["foreign_cpu_cores"],
                "errors": sum(top["errors"].values()),
            }
        )
    return {
        "offline_limit": offline["throughput"],
        "offline_best_batch": offline["batch_size"],
        "direct_latency_ms": direct,
        "offline_limit_measured": measured["throughput"],
        "offline_best_batch_measured": measured["batch_size"],
        "direct_latency_ms_measured": measured_direct,
        "bare_fastapi_requests_per_s": bare,
        "rows": rows,
        "devices": sim_devices_rows(result, offline["throughput"]),
    }


def sim_devices_rows(result: dict[str, Any], offline: float) -> list[dict[str, Any]]:
    """One row per server with several simulated devices (or its one-device baseline) and
    concurrency above 1: requests/s, served over N devices' offline limit, and the gain
    over the one-device server of the same front ends at the same concurrency."""
    entries = [
        e for e in result["servers"] if e.get("devices") and e["name"].startswith("new-") and e["points"]
    ]
    if not any(e["devices"] > 1 for e in entries):
        return []
    base = {
        (e["name"].rsplit("-d", 1)[0], p["concurrency"]): p["throughput"]
        for e in entries
        if e["devices"] == 1
        for p in e["points"]
    }
    rows = []
    for e in entries:
        for p in e["points"]:
            if p["concurrency"] == 1:
                continue
            n = max(p["requests"], 1)
            one = base.get((e["name"].rsplit("-d", 1)[0], p["concurrency"]), float("nan"))
            rows.append(
                {
                    "server": e["name"],
                    "devices": e["devices"],
                    "concurrency": p["concurrency"],
                    "requests_per_s": p["throughput"],
                    "over_one_device": p["throughput"] / one,
                    "served_over_offline_per_device": p["throughput"] / (offline * e["devices"]),
                    "mean_batch_size": p["mean_batch_size"],
                    "p50_ms": p["p50_ms"],
                    "p99_ms": p["p99_ms"],
                    "server_cpu_ms_per_request": sum(q["cpu_s"] for q in p["processes"]) * 1000 / n,
                    "cpu_ms_per_request_by_process": "; ".join(
                        f"{q['role']} {q['cpu_s'] * 1000 / n:.2f}" for q in p["processes"] if q["cpu_s"] > 0
                    ),
                    "client_cpu_cores": p["client_cpu_cores"],
                    "foreign_cpu_cores": p["foreign_cpu_cores"],
                    "errors": sum(p["errors"].values()),
                }
            )
    return rows


def sim_report(result: dict[str, Any]) -> str:
    s = result["summary"]
    prof = result["profile"]
    head = (
        f"\nSIMULATED DEVICE (bench/simdevice.py, profile {prof['profile']}: {prof['launch_ms']} ms holding "
        f"the GIL, then device ms {prof['device_ms']}); NOT a model forward.\n"
        f"offline (nominal, ratios use it): {common.fmt(s['offline_limit'])} inputs/s at batch "
        f"{s['offline_best_batch']}, batch-1 call {common.fmt(s['direct_latency_ms'])} ms; measured here "
        f"(the stand-in called directly): {common.fmt(s['offline_limit_measured'])} inputs/s at batch "
        f"{s['offline_best_batch_measured']}, batch-1 call {common.fmt(s['direct_latency_ms_measured'])} ms; "
        f"bare FastAPI: {common.fmt(s['bare_fastapi_requests_per_s'])} requests/s"
    )
    table = common.table(
        s["rows"],
        [
            "server",
            "concurrency",
            "requests_per_s",
            "served_over_offline",
            "served_over_bare",
            "p50_ms",
            "p99_ms",
            "mean_batch_size",
            "p50_c1_ms",
            "p50_c1_over_direct",
            "served_over_offline_measured",
            "p50_c1_over_direct_measured",
            "server_cpu_ms_per_request",
            "cpu_ms_per_request_by_process",
            "client_cpu_cores",
            "foreign_cpu_cores",
            "errors",
        ],  # fmt: skip
        title="Served with a SIMULATED device, closed loop (one text input per request)",
    )
    if s.get("devices"):  # its rows' keys, in order, are the columns
        table += "\n" + common.table(
            s["devices"],
            list(s["devices"][0]),
            title="SIMULATED devices, one engine each (--sim-devices): scaling, served / (devices x offline)",
        )
    return head + "\n" + table


# --------------------------------------------------------------------------- summary


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Per point: best repeat and median over repeats; references; target ratios.

    On a shared machine noise only ever slows things down (other processes take CPU), so
    the primary figure of each point is its best repeat (highest throughput; its own
    latencies), as for ``timeit``; the median and the spread over repeats are reported
    next to it. Ratios use best-of-repeats on both sides, and also each repeat's own pair
    (``per_repeat``) to show how much they move.
    """
    summary: dict[str, Any] = {"points": [], "references": {}, "targets": {}}
    for group in result["groups"]:
        for kind in group["kinds"]:
            off = [r for r in group["offline"] if r["kind"] == kind]
            reps = sorted({r["repeat"] for r in off})
            best = {rep: max(r["throughput"] for r in off if r["repeat"] == rep) for rep in reps}
            best_b = {
                rep: max((r for r in off if r["repeat"] == rep), key=lambda r: r["throughput"])["batch_size"]
                for rep in reps
            }
            b1 = {r["repeat"]: r["throughput"] for r in off if r["batch_size"] == 1}
            direct = {r["repeat"]: r["ms_per_call_p50"] for r in off if r["batch_size"] == 1}
            by_batch = {}
            for b in sorted({r["batch_size"] for r in off}):
                vals = [r["throughput"] for r in off if r["batch_size"] == b]
                by_batch[str(b)] = {"best": max(vals), **common.spread(vals)}
            off_best = max(best.values())
            b1_best = max(b1.values(), default=float("nan"))  # nan: the sweep skipped batch 1
            ref = {
                "checkpoint": group["checkpoint"],
                "tokens_per_input": group["tokens_per_input"][kind],
                "offline_limit": off_best,
                "offline_limit_repeats": common.spread(list(best.values())),
                "offline_best_batch": [best_b[r] for r in reps],
                "batch1_rate": b1_best,
                "batch1_rate_repeats": common.spread(list(b1.values())),
                "direct_latency_ms": min(direct.values(), default=float("nan")),
                "direct_latency_ms_repeats": common.spread(list(direct.values())),
                "batching_ceiling": off_best / b1_best,
                "offline_by_batch": by_batch,
            }
            summary["references"][kind] = ref
            best_pts: dict[tuple[str, int], dict[str, Any]] = {}
            for server in dict.fromkeys(p["server"] for p in group["points"] if p["kind"] == kind):
                pts = [p for p in group["points"] if p["kind"] == kind and p["server"] == server]
                for c in sorted({p["concurrency"] for p in pts}):
                    at = [p for p in pts if p["concurrency"] == c]
                    top = max(at, key=lambda p: p["throughput"])
                    best_pts[(server, c)] = top
                    row: dict[str, Any] = {
                        "kind": kind,
                        "server": server,
                        "concurrency": c,
                        "repeats": len(at),
                    }
                    for key in ("throughput", "p50_ms", "p95_ms", "p99_ms", "mean_batch_size", "ms_per_batch",
                                "device_busy", "server_cpu_cores", "client_cpu_cores", "foreign_cpu_cores",
                                "header_preprocess_ms", "header_queue_ms", "header_inference_ms",
                                "quiet_fraction"):  # fmt: skip
                        row[key] = top.get(key, float("nan"))
                    quiet_tp = [p.get("throughput_quiet", float("nan")) for p in at]
                    quiet_tp = [x for x in quiet_tp if x == x]
                    row["throughput_quiet_best"] = max(quiet_tp) if quiet_tp else float("nan")
                    for key in ("throughput", "p50_ms", "p99_ms"):
                        sp = common.spread([p[key] for p in at])
                        row[key + "_median"] = sp["median"]
                        row[key + "_spread"] = sp["rel_range"]
                    row["foreign_cpu_cores_max"] = max(p["foreign_cpu_cores"] for p in at)
                    row["errors"] = sum(sum(p["errors"].values()) for p in at)
                    summary["points"].append(row)
            # Targets.
            batched = {
                (p["repeat"], p["concurrency"]): p
                for p in group["points"]
                if p["kind"] == kind and p["server"] == "batched"
            }
            naive = {
                (p["repeat"], p["concurrency"]): p
                for p in group["points"]
                if p["kind"] == kind and p["server"] == "naive"
            }
            cmax = max((c for _, c in batched), default=None)
            t: dict[str, Any] = {}
            if cmax is not None:
                served = best_pts[("batched", cmax)]["throughput"]
                t[f"served_over_offline_at_c{cmax}"] = {
                    "best": served / off_best,
                    "per_repeat": [
                        batched[(r, cmax)]["throughput"] / best[r] for r in reps if (r, cmax) in batched
                    ],
                }
                if ("naive", cmax) in best_pts:
                    gain = served / best_pts[("naive", cmax)]["throughput"]
                    t[f"served_over_naive_at_c{cmax}"] = {
                        "best": gain,
                        "per_repeat": [
                            batched[(r, cmax)]["throughput"] / naive[(r, cmax)]["throughput"]
                            for r in reps
                            if (r, cmax) in naive
                        ],
                    }
                if ("naive", cmax) in best_pts and b1:
                    t["batching_ceiling"] = {
                        "best": off_best / b1_best,
                        "per_repeat": [best[r] / b1[r] for r in reps],
                    }
                    t[f"gain_fraction_of_ceiling_at_c{cmax}"] = {
                        "best": gain / (off_best / b1_best),
                        "per_repeat": [
                            (batched[(r, cmax)]["throughput"] / naive[(r, cmax)]["throughput"])
                            / (best[r] / b1[r])
                            for r in reps
                            if (r, cmax) in naive
                        ],
                    }
                if ("batched", 1) in best_pts and direct:
                    p50s = [batched[(r, 1)]["p50_ms"] for r in reps if (r, 1) in batched]
                    t["p50_c1_over_direct"] = {
                        "best": min(p50s) / min(direct.values()),
                        "per_repeat": [
                            batched[(r, 1)]["p50_ms"] / direct[r] for r in reps if (r, 1) in batched
                        ],
                    }
            summary["targets"][kind] = t
    return summary


def report(result: dict[str, Any]) -> str:
    s = result["summary"]
    out = [
        common.table(
            s["points"],
            [
                "kind",
                "server",
                "concurrency",
                "throughput",
                "throughput_median",
                "throughput_spread",
                "p50_ms",
                "p95_ms",
                "p99_ms",
                "p99_ms_median",
                "mean_batch_size",
                "ms_per_batch",
                "device_busy",
                "server_cpu_cores",
                "client_cpu_cores",
                "foreign_cpu_cores",
                "foreign_cpu_cores_max",
                "quiet_fraction",
                "throughput_quiet_best",
                "errors",
            ],  # fmt: skip
            title="Served, closed loop (best repeat; *_median and *_spread = (max - min) / median over repeats; "
            "foreign = cores used by other processes during the best repeat)",
        )
    ]
    refs = [
        {
            "kind": kind,
            "tokens_per_input": r["tokens_per_input"],
            "offline_limit": r["offline_limit"],
            "offline_limit_spread": r["offline_limit_repeats"]["rel_range"],
            "best_batch": ",".join(str(b) for b in r["offline_best_batch"]),
            "batch1_rate": r["batch1_rate"],
            "batching_ceiling": r["batching_ceiling"],
            "direct_latency_ms": r["direct_latency_ms"],
            "direct_latency_spread": r["direct_latency_ms_repeats"]["rel_range"],
        }
        for kind, r in s["references"].items()
    ]
    out.append(
        common.table(
            refs,
            [
                "kind",
                "tokens_per_input",
                "offline_limit",
                "offline_limit_spread",
                "best_batch",
                "batch1_rate",
                "batching_ceiling",
                "direct_latency_ms",
                "direct_latency_spread",
            ],  # fmt: skip
            title="References (in-process embed(), same checkpoint, same run; inputs/s and ms; best of repeats)",
        )
    )
    for kind, r in s["references"].items():
        out.append(
            f"\noffline inputs/s by batch size ({kind}; best / median of repeats): "
            + ", ".join(
                f"{b}: {common.fmt(v['best'])} / {common.fmt(v['median'])}"
                for b, v in r["offline_by_batch"].items()
            )
        )
    trows = []
    goals = {"served_over_offline": ">= 0.9", "gain_fraction": ">= 0.85", "p50_c1_over_direct": "<= 1.15"}
    for kind, t in s["targets"].items():
        for name, v in t.items():
            goal = next((g for key, g in goals.items() if name.startswith(key)), "")
            trows.append(
                {
                    "kind": kind,
                    "figure": name,
                    "best_of_repeats": v["best"],
                    "per_repeat": ", ".join(common.fmt(x) for x in v["per_repeat"]),
                    "target": goal,
                }  # fmt: skip
            )
    out.append(
        common.table(trows, ["kind", "figure", "best_of_repeats", "per_repeat", "target"], title="Targets")
    )
    return "\n".join(out)


# --------------------------------------------------------------------------- chart


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(15, 5))
    colours = {"text": "tab:blue", "image": "tab:orange", "mixed": "tab:green"}
    for kind in s["references"]:
        servers = dict.fromkeys(p["server"] for p in s["points"] if p["kind"] == kind)
        for server in servers:
            style = {"batched": "-o", "naive": "--x"}.get(server, "-.s")
            pts = sorted(
                (p for p in s["points"] if p["kind"] == kind and p["server"] == server),
                key=lambda p: p["concurrency"],
            )
            if not pts:
                continue
            cs = [p["concurrency"] for p in pts]
            label = f"{kind} {server}"
            ax_t.plot(cs, [p["throughput"] for p in pts], style, color=colours[kind], label=label)
            ax_l.plot(cs, [p["p50_ms"] for p in pts], style, color=colours[kind], label=f"{label} p50")
            if server == "batched":
                ax_l.plot(cs, [p["p99_ms"] for p in pts], ":", color=colours[kind], label=f"{label} p99")
        ax_t.axhline(s["references"][kind]["offline_limit"], color=colours[kind], alpha=0.4, lw=1,
                     label=f"{kind} offline limit")  # fmt: skip
    for ax in (ax_t, ax_l):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_ylabel("throughput (inputs/s)")
    ax_l.set_ylabel("latency (ms)")
    ax_t.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax_l.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    m = result.get("machine", {})
    models = "; ".join(f"{'/'.join(g['kinds'])}: {Path(g['checkpoint']).name}" for g in result["groups"])
    fig.suptitle(
        f"bench/serve.py on {m.get('gpu') or m.get('cpu', '?')} ({result['args']['device']}, "
        f"{result['args']['dtype']}); {models}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run atexit: stop the servers
    args = parse_args(argv)
    if args.plot_only:
        import json

        result = json.loads(args.plot_only.read_text())
        result["summary"] = summarise(result)  # recomputed: the summary's format may have changed
        plot(result, args.plot_only.with_suffix(".png"))
        print(report(result))
        return
    if args.simulate:
        result = asyncio.run(run_simulated(args))
        path = common.write_results("serve-sim" + (f"-{args.tag}" if args.tag else ""), result)
        print(sim_report(result))
        return
    result = asyncio.run(run(args))
    name = "serve" + (f"-{args.tag}" if args.tag else "") + ("-quick" if args.quick and not args.tag else "")
    path = common.write_results(name, result)
    print(report(result))
    if not args.no_plot:
        try:
            plot(result, path.with_suffix(".png"))
        except ImportError:
            log("matplotlib is not installed: no chart (redraw later with --plot-only)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
