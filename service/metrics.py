"""Prometheus metrics, one registry per app (so several apps can live in one process).

With several processes (``python -m service``: front ends and the engine process), every
process writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR`` (set by the server at
start-up, before anything imports prometheus_client) and ``/metrics`` on any front end
adds them all up: counters and histograms are summed, the queue and connection gauges
summed over live processes, the ready/alive gauges are the live processes' maximum.

- ``llave_requests_total{route,status}``: every answered request; ``route`` is the route's
  path template (``/collections/{name}``), or ``unmatched`` for unknown paths.
- ``llave_queue_inputs``: inputs admitted by the front ends and not yet answered (what
  ``--max-queue`` bounds).
- ``llave_batch_size``, ``llave_batch_tokens``: per forward pass; tokens are padded tokens
  (longest input x batch size), what the device actually computes.
- ``llave_stage_seconds{stage}``: ``preprocess`` (per input, in the worker pool),
  ``queue`` (per input, admission to the device), ``inference`` (per forward pass).
- ``llave_forward_isolations_total``: forward passes that failed and were run again by
  halves, so that only the failing inputs fail (``service/inference/engine.py``).
- ``llave_ready``, ``llave_worker_alive``: 0/1 gauges for alerting (1 while any engine is).
- Per engine (one per device, ``--devices``), labelled ``engine`` (its index) and
  ``device`` (``cuda:1``, ``cpu``): ``llave_batches_total`` (forward passes run),
  ``llave_engine_queue_inputs`` (inputs the engine holds: queued or on the device) and
  ``llave_engine_ready`` (1 while it serves), all written by the engine process itself.
- ``llave_connections_open``: client connections open in this process (``--max-connections``).
- ``llave_connections_closed_total{reason}``: connections the server's guards closed
  (``service/http/connections.py``): ``header_timeout``, ``body_timeout`` (408),
  ``over_capacity`` (503 at ``--max-connections``), ``idle_evicted`` (an idle keep-alive
  connection closed to make room for a new one).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_POW2 = tuple(float(2**i) for i in range(0, 11))  # 1 .. 1024
_TOKENS = tuple(float(2**i) for i in range(4, 21))  # 16 .. 1M
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST
CONNECTION_CLOSE_REASONS = ("header_timeout", "body_timeout", "over_capacity", "idle_evicted")


class Metrics:
    """The server's metrics; ``render()`` gives the exposition text for ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "llave_requests", "HTTP requests answered", ["route", "status"], registry=self.registry
        )
        self.queue_inputs = Gauge(
            "llave_queue_inputs",
            "Inputs admitted and not yet answered (all front ends)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.pixel_bytes = Gauge(
            "llave_pixel_bytes",
            "Bytes of decoded image crops held for requests in flight (all front ends; each "
            "front end holds at most --max-pixel-bytes)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.body_bytes = Gauge(
            "llave_body_bytes",
            "Bytes of request bodies held for requests in flight (all front ends; each front "
            "end holds at most --max-buffered-body-bytes)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.batch_size = Histogram(
            "llave_batch_size", "Inputs per forward pass", buckets=_POW2, registry=self.registry
        )
        self.batch_tokens = Histogram(
            "llave_batch_tokens",
            "Padded tokens per forward pass (longest input x batch size)",
            buckets=_TOKENS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "llave_stage_seconds",
            "Time spent per stage: preprocess and queue per input, inference per forward pass",
            ["stage"],
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.forward_isolations = Counter(
            "llave_forward_isolations",
            "Failed forward passes run again by halves to isolate the failing inputs",
            registry=self.registry,
        )
        self.ready = Gauge(
            "llave_ready",
            "1 when the model is loaded and warmed up",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.worker_alive = Gauge(
            "llave_worker_alive",
            "1 while the engine process is running",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.batches = Counter(
            "llave_batches", "Forward passes run, per engine", ["engine", "device"], registry=self.registry
        )
        self.engine_queue_inputs = Gauge(
            "llave_engine_queue_inputs",
            "Inputs an engine holds (queued or on the device), per engine",
            ["engine", "device"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.engine_ready = Gauge(
            "llave_engine_ready",
            "1 while an engine serves, per engine",
            ["engine", "device"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        for stage in ("preprocess", "queue", "inference"):
            self.stage_seconds.labels(stage=stage)  # exported from the start, at zero
        self.connections_open = Gauge(
            "llave_connections_open",
            "Client connections open (all front ends)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.connections_closed = Counter(
            "llave_connections_closed",
            "Client connections closed by the server's guards, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in CONNECTION_CLOSE_REASONS:
            self.connections_closed.labels(reason=reason)

    def render(self) -> bytes:
        if exporting_across_processes():
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)


def exporting_across_processes() -> bool:
    """Whether samples go to the shared multi-process directory (``python -m service``)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
