"""Many concurrent clients, well past capacity, for a bounded time: what they got, and the server's memory.

Each client loops over a mix of requests (texts, an image, the OpenAI route, vector and
text searches, vector upserts) until the deadline; after a 429 it waits a little (a
client that honours Retry-After would wait longer, which would load the server less).
A thread samples the server's RSS meanwhile. Every upsert that got a 200 is remembered,
so the caller can check that none was lost.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from tests.conftest import b64, make_png
from tests.reliability.helpers import assert_healthy, rss_bytes

DIM = 64  # the tiny model's
IMAGE = b64(make_png(48, 40))


@dataclass
class LoadReport:
    clients: int
    seconds: float
    statuses: Counter = field(default_factory=Counter)  # (route, status) -> count
    transport_errors: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)  # first few bodies of unexpected answers
    acked_ids: set[str] = field(default_factory=set)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def by_status(self) -> Counter:
        out: Counter = Counter()
        for (_, status), n in self.statuses.items():
            out[status] += n
        return out

    def summary(self) -> dict:
        rss = [b for _, b in self.rss_samples]
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 1),
            "requests": self.requests,
            "by_status": {str(k): v for k, v in sorted(self.by_status().items())},
            "transport_errors": sum(self.transport_errors.values()),
            "acked_upserted_docs": len(self.acked_ids),
            "rss_mib_first": round(rss[0] / 2**20, 1) if rss else None,
            "rss_mib_peak": round(max(rss) / 2**20, 1) if rss else None,
            "rss_mib_last": round(rss[-1] / 2**20, 1) if rss else None,
        }


def _body(kind: str, rng: random.Random, client_id: int, n: int, collection: str) -> tuple[str, dict]:
    if kind == "embed-texts":
        k = rng.randint(1, 8)
        return "/embed", {
            "inputs": [
                {"text": f"client {client_id} request {n} item {i} " * rng.randint(1, 6)} for i in range(k)
            ]
        }
    if kind == "embed-image":
        return "/embed", {"inputs": [{"image": IMAGE, "text": f"what is this {n}"}]}
    if kind == "openai":
        return "/v1/embeddings", {"input": [f"openai {client_id} {n}", "second"]}
    if kind == "search-vector":
        return "/search", {
            "collection": collection,
            "query": {"vector": [rng.gauss(0, 1) for _ in range(DIM)]},
            "k": 5,
        }
    if kind == "search-text":
        return "/search", {"collection": collection, "query": {"text": f"query {n}"}, "k": 3}
    ids = [f"load-{client_id}-{n}-{j}" for j in range(4)]
    vectors = np.random.default_rng(client_id * 100_003 + n).standard_normal((4, DIM))
    return f"/collections/{collection}/documents", {
        "documents": [
            {"id": i, "vector": v.tolist(), "metadata": {"c": client_id}}
            for i, v in zip(ids, vectors, strict=True)
        ]
    }


KINDS = ["embed-texts", "embed-texts", "embed-image", "openai", "search-vector", "search-text", "upsert"]
ALLOWED = {200, 429, 503}


def _route(path: str) -> str:
    return "/collections/{name}/documents" if path.startswith("/collections/") else path


async def _client(
    client: httpx.AsyncClient, report: LoadReport, client_id: int, deadline: float, collection: str, seed: int
) -> None:
    rng = random.Random(seed * 7919 + client_id)
    n = 0
    while time.monotonic() < deadline:
        kind = rng.choice(KINDS)
        path, body = _body(kind, rng, client_id, n, collection)
        n += 1
        try:
            response = await client.post(path, json=body)
        except httpx.TransportError as exc:
            report.transport_errors[type(exc).__name__] += 1
            await asyncio.sleep(0.05)
            continue
        report.statuses[(_route(path), response.status_code)] += 1
        if response.status_code == 200 and kind == "upsert":
            report.acked_ids.update(d["id"] for d in body["documents"])
        elif response.status_code == 503 and "within" not in response.text:
            report.unexpected.append(f"503 that is not a timeout: {response.text[:200]}")
        elif response.status_code not in ALLOWED and len(report.unexpected) < 20:
            report.unexpected.append(f"{path} -> {response.status_code}: {response.text[:200]}")
        if response.status_code == 429:
            await asyncio.sleep(rng.uniform(0.01, 0.1))


def run_load(
    url: str,
    pid: int,
    *,
    clients: int,
    seconds: float,
    collection: str,
    headers: dict | None = None,
    seed: int = 0,
) -> LoadReport:
    """``clients`` concurrent clients for ``seconds``; the collection must exist with dim 64."""
    report = LoadReport(clients=clients, seconds=seconds)
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            try:
                report.rss_samples.append((time.monotonic() - started, rss_bytes(pid)))
            except (OSError, RuntimeError):
                return
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def main() -> None:
        # keep-alive shorter than the server's (uvicorn: 5 s), or a reused connection can race its close
        limits = httpx.Limits(
            max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0
        )
        timeout = httpx.Timeout(120.0, pool=None)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, headers=headers) as client:
            deadline = time.monotonic() + seconds
            await asyncio.gather(
                *(_client(client, report, i, deadline, collection, seed) for i in range(clients))
            )

    try:
        asyncio.run(main())
    finally:
        stop.set()
        sampler.join()
    report.seconds = time.monotonic() - started
    return report


def median_latency(url: str, headers: dict | None = None, n: int = 7) -> float:
    """Median seconds of a one-text /embed on an otherwise idle server."""
    times = []
    with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        for i in range(n):
            t = time.perf_counter()
            response = client.post("/embed", json={"inputs": [{"text": f"latency probe {i}"}]})
            times.append(time.perf_counter() - t)
            assert response.status_code == 200, response.text
    return statistics.median(times)


def server_counts(url: str) -> dict[tuple[str, int], float]:
    """``llave_requests_total`` by (route, status), from /metrics."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("llave_requests_total{"):
            labels, _, value = line.rpartition(" ")
            route = labels.split('route="', 1)[1].split('"', 1)[0]
            status = int(labels.split('status="', 1)[1].split('"', 1)[0])
            out[(route, status)] = float(value)
    return out


def check_overload(
    server: Any, *, clients: int, seconds: float, collection: str = "load", seed: int = 0
) -> dict:
    """Run the load and hold the server to it: only 200/429 (503 only for a timeout), the
    server counted exactly what the clients saw, memory bounded (and not creeping up over a
    long run), healthy and about as quick as before afterwards, every acknowledged upsert stored."""
    url, auth = server.url, server.auth
    with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
        assert client.put(f"/collections/{collection}", json={"dim": DIM}).status_code == 200
    baseline_latency = median_latency(url, auth)
    baseline_rss = rss_bytes(server.proc.pid)
    before = server_counts(url)

    report = run_load(
        url, server.proc.pid, clients=clients, seconds=seconds, collection=collection, headers=auth, seed=seed
    )

    summary = report.summary()
    assert not report.transport_errors, report.transport_errors
    assert not report.unexpected, report.unexpected
    assert set(report.by_status()) <= ALLOWED, report.by_status()
    assert report.by_status()[200] > 0 and report.by_status()[429] > 0, summary  # really past capacity
    after = server_counts(url)
    for (route, status), n in report.statuses.items():
        assert after.get((route, status), 0) - before.get((route, status), 0) == n, (route, status, n)
    # Memory: a generous ceiling (the queue caps the work in flight), and no creep: the last
    # third of the run peaks at most 256 MiB above the first third.
    rss = [b for _, b in report.rss_samples]
    assert max(rss) < baseline_rss + 1.5 * 2**30, summary
    third = max(1, len(rss) // 3)
    assert max(rss[-third:]) < max(rss[:third]) + 256 * 2**20, summary

    assert server.metric("llave_queue_inputs") == 0
    assert_healthy(url, auth)
    latency_after = median_latency(url, auth)
    assert latency_after < 10 * baseline_latency + 1.0
    acked = sorted(report.acked_ids)
    with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
        for start in range(0, len(acked), 5000):
            chunk = acked[start : start + 5000]
            found = client.post(f"/collections/{collection}/existing", json={"ids": chunk}).json()["existing"]
            assert len(found) == len(chunk), sorted(set(chunk) - set(found))[:10]
        assert client.get(f"/collections/{collection}").json()["count"] == len(acked)
    summary.update(
        baseline_rss_mib=round(baseline_rss / 2**20, 1),
        latency_ms_before=round(baseline_latency * 1000, 1),
        latency_ms_after=round(latency_after * 1000, 1),
        acked_docs_lost=0,
    )
    return summary
