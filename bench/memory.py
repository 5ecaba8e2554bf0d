"""Memory of every server process under a hostile mix: is it bounded by the byte budgets?

    python bench/memory.py                      # LLaVE-0.5B shapes, simulated forward, 60 s
    python bench/memory.py --seconds 20 --api-workers 1 --tag quick

Starts the real server (``python -m bench.simserver``: ``python -m service`` whose forward
pass is simulated, bench/simdevice.py, so that a CPU machine spends its time on what
this measures: HTTP bodies, image decoding and tiling, shared memory, search answers) on a
random checkpoint with LLaVE-0.5B's shapes (``model.tiny --preset llave-0.5b``: 384 px
crops, a 2x2 grid, so one image decodes to at most 5 crops, 8.8 MB of float32), fills a
collection whose documents keep large texts and 1024 px thumbnails, then runs for
``--seconds`` at once:

- **large images**: clients posting /embed with 8 inputs of one 2048 x 2048 JPEG each
  (about 20 MB of body; 71 MB of crops at most);
- **many bodies**: clients posting about 28 MB bodies (vector-only upserts of 1,500
  documents), and slow clients that declare such a body and send it over 5 s (each holds
  its declared length from the start);
- **big searches**: clients asking /search for 100 (over the answer bound: 413) or 30 hits
  with texts and thumbnails.

Every 0.2 s it samples the resident set (RSS) of every process of the server (psutil when
installed, else /proc) and the bytes in /dev/shm, then prints a table (idle and peak RSS per
role, the budgets in force, answers by status) and writes ``bench/results/memory[-TAG].json``.
RSS counts shared pages (shared memory a process mapped) in every process that touched them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    PYTHON,
    REPO,
    ensure_checkpoint,
    free_port,
    log,
    machine_info,
    offline_env,
    process_role,
    process_tree,
    rss_bytes,
    table,
    write_results,
)

MB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llave-0.5b", help="model.tiny preset of the checkpoint")
    p.add_argument("--checkpoint", type=Path, help="serve this checkpoint instead of building one")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the hostile mix")
    p.add_argument("--api-workers", type=int, default=2)
    p.add_argument("--image-clients", type=int, default=12)
    p.add_argument("--body-clients", type=int, default=8)
    p.add_argument("--slow-clients", type=int, default=8)
    p.add_argument("--search-clients", type=int, default=6)
    p.add_argument("--server-arg", action="append", default=[], help="an extra server flag (repeatable)")
    p.add_argument("--tag", default="", help="suffix of the results file")
    return p.parse_args(argv)


# --- inputs ------------------------------------------------------------------------------------


def noise_jpeg(size: int, seed: int, quality: int = 85) -> bytes:
    """A JPEG of random blocks: large when encoded, as photos are (flat colours compress to nothing)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.Resampling.NEAREST)
    noise = rng.integers(0, 48, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(np.asarray(img) ^ noise)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- the server --------------------------------------------------------------------------------


class Server:
    def __init__(self, checkpoint: Path, workdir: Path, api_workers: int, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            "--model", str(checkpoint), "--port", str(self.port), "--data-dir", str(workdir / "data"),
            "--api-workers", str(api_workers), "--log-level", "warning", *extra,
        ]  # fmt: skip
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "bench.simserver", *self.args],
            cwd=REPO,
            env=offline_env(LLAVE_SIM_PROFILE="h100"),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text(errors='replace')}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def roles(root: int) -> dict[int, str]:
    return {pid: process_role(cmd, pid == root) for pid, cmd in process_tree(root).items()}


def rss(pid: int) -> int:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        return rss_bytes(pid)
    except Exception:  # the process ended between listing and reading
        return 0


def shm_bytes() -> int:
    total = 0
    for path in Path("/dev/shm").glob("llave-*"):
        try:
            total += path.stat().st_blocks * 512
        except OSError:
            pass
    return total


class Sampler(threading.Thread):
    """Peak RSS per role (and /dev/shm) every ``interval_s`` until stopped."""

    def __init__(self, root: int, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.interval_s = root, interval_s
        self.peak: dict[str, int] = {}
        self.peak_total = 0
        self.peak_shm = 0
        self.samples = 0
        self._done = threading.Event()

    def snapshot(self) -> dict[str, int]:
        return {role: rss(pid) for pid, role in roles(self.root).items()}

    def run(self) -> None:
        while not self._done.is_set():
            now = self.snapshot()
            for role, value in now.items():
                self.peak[role] = max(self.peak.get(role, 0), value)
            self.peak_total = max(self.peak_total, sum(now.values()))
            self.peak_shm = max(self.peak_shm, shm_bytes())
            self.samples += 1
            self._done.wait(self.interval_s)

    def stop(self) -> None:
        self._done.set()
        self.join()


# --- the hostile mix ---------------------------------------------------------------------------


async def setup_collection(url: str, images: list[bytes]) -> None:
    """A collection whose documents keep 200 KB of text and a 1024 px thumbnail each."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        r = await client.put("/collections/big", json={"thumbnail_size": 1024, "thumbnail_format": "jpeg"})
        r.raise_for_status()
        rng = random.Random(0)
        words = "red green blue circle square star large small shape picture".split()
        for start in range(0, 100, 4):
            docs = [
                {
                    "id": f"d{i}",
                    "text": " ".join(rng.choice(words) for _ in range(40_000)),
                    "image": b64(images[i % len(images)]),
                }
                for i in range(start, start + 4)
            ]
            r = await client.post("/collections/big/documents", json={"documents": docs})
            r.raise_for_status()


async def hostile_mix(url: str, args: argparse.Namespace, images: list[bytes], dim: int) -> dict[str, Any]:
    import httpx

    statuses: dict[str, Counter[str]] = {k: Counter() for k in ("images", "bodies", "slow", "searches")}
    stop_at = time.monotonic() + args.seconds
    image_body = {"inputs": [{"image": b64(images[i % len(images)])} for i in range(8)]}
    rng = random.Random(1)
    vector_docs = [{"id": f"v{i}", "vector": [rng.uniform(-1, 1) for _ in range(dim)]} for i in range(1500)]
    vector_body = json.dumps({"documents": vector_docs}).encode()
    body_bytes = len(vector_body)

    async def loop(kind: str, client: httpx.AsyncClient, send: Any) -> None:
        while time.monotonic() < stop_at:
            try:
                r = await send(client)
                statuses[kind][str(r.status_code)] += 1
                if r.status_code in (429, 503):
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            except httpx.HTTPError as exc:
                statuses[kind][type(exc).__name__] += 1
                await asyncio.sleep(0.2)

    async def slow_body() -> None:
        """Declare a large body and send it over about 5 s."""
        while time.monotonic() < stop_at:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
                writer.write(
                    b"POST /collections/vectors/documents HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nConnection: close\r\n"
                    + f"Content-Length: {body_bytes}\r\n\r\n".encode()
                )
                for start in range(0, body_bytes, body_bytes // 25 + 1):
                    writer.write(vector_body[start : start + body_bytes // 25 + 1])
                    await writer.drain()
                    await asyncio.sleep(0.2)
                head = await asyncio.wait_for(reader.read(64), timeout=120)
                statuses["slow"][head.split(b" ", 2)[1].decode() if head.count(b" ") >= 2 else "closed"] += 1
                writer.close()
            except (OSError, TimeoutError) as exc:
                statuses["slow"][type(exc).__name__] += 1
                await asyncio.sleep(0.5)

    search = {"collection": "big", "query": {"text": "a red circle"}, "include": ["text", "thumbnail"]}
    ks = iter(lambda: rng.choice((100, 30)), None)
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        r = await client.put("/collections/vectors", json={"dim": dim})
        assert r.status_code in (200, 409), r.text
        tasks = [
            *(loop("images", client, lambda c: c.post("/embed", json=image_body)) for _ in range(args.image_clients)),
            *(
                loop("bodies", client, lambda c: c.post("/collections/vectors/documents", content=vector_body, headers=headers))
                for _ in range(args.body_clients)
            ),
            *(slow_body() for _ in range(args.slow_clients)),
            *(loop("searches", client, lambda c: c.post("/search", json={**search, "k": next(ks)})) for _ in range(args.search_clients)),
        ]  # fmt: skip
        await asyncio.gather(*tasks)
    return {
        "statuses": {k: dict(v) for k, v in statuses.items()},
        "image_request_body_mb": round(len(json.dumps(image_body)) / MB, 1),
        "vector_body_mb": round(body_bytes / MB, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import httpx

    checkpoint = args.checkpoint or ensure_checkpoint(args.preset)
    log("making images ...")
    images = [noise_jpeg(2048, seed) for seed in range(4)]
    with tempfile.TemporaryDirectory(prefix="llave-memory-") as tmp:
        server = Server(checkpoint, Path(tmp), args.api_workers, args.server_arg)
        try:
            server.wait_ready()
            info = httpx.get(server.url + "/info", timeout=30).json()
            log("filling the collection (100 documents, 200 KB of text and a 1024 px thumbnail each) ...")
            asyncio.run(setup_collection(server.url, images))
            sampler = Sampler(server.proc.pid)
            idle = sampler.snapshot()
            log(f"hostile mix for {args.seconds:g} s ...")
            sampler.start()
            mix = asyncio.run(hostile_mix(server.url, args, images, info["dim"]))
            sampler.stop()
            after = sampler.snapshot()
            healthy = httpx.get(server.url + "/health", timeout=30).status_code
        finally:
            server.stop()
    lim = info["limits"]
    rows = [
        {
            "role": role,
            "idle MB": idle.get(role, 0) / MB,
            "peak MB": sampler.peak.get(role, 0) / MB,
            "after MB": after.get(role, 0) / MB,
        }
        for role in sorted(sampler.peak)
    ]
    rows.append(
        {
            "role": "all processes",
            "idle MB": sum(idle.values()) / MB,
            "peak MB": sampler.peak_total / MB,
            "after MB": sum(after.values()) / MB,
        }
    )
    rows.append(
        {"role": "/dev/shm (llave-*)", "idle MB": 0.0, "peak MB": sampler.peak_shm / MB, "after MB": 0.0}
    )
    budgets = {
        k: lim[k]
        for k in (
            "max_pixel_bytes",
            "max_buffered_body_bytes",
            "max_body_bytes",
            "max_search_response_bytes",
            "max_k_with_sources",
            "front_end_queue_share",
        )
    }
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "checkpoint": str(checkpoint),
        "budgets_per_front_end": budgets,
        "rss_mb": rows,
        "samples": sampler.samples,
        "mix": mix,
        "health_after": healthy,
        "machine": machine_info(),
    }
    name = "memory" + (f"-{args.tag}" if args.tag else "")
    write_results(name, results)
    print(table(rows, ["role", "idle MB", "peak MB", "after MB"], title="RSS of every server process"))
    print("\nbudgets per front end:", json.dumps(budgets))
    print("answers:", json.dumps(mix["statuses"]))
    print("health after the mix:", healthy)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
