"""The three stages a block goes through, as Ray Data runs them.

1. ``prepare_block`` (CPU task): read the block's items, decode, tile and tokenise them with
   the checkpoint's ``model.Preprocessor`` (loaded without the weights, once per worker
   process), and make their sources when the target keeps them. Bad items become failures.
2. ``EmbedBlocks`` (actor pool: one model per GPU, or CPU actors): the forward, in
   length-sorted chunks; the pooled vectors before normalisation, as the server's engine.
3. ``finish_block`` (CPU task): normalise with ``service.vectors.normalised_rows`` (what
   ``/embed`` answers) and write the block to the sink in one piece.

A block travels as one row ``{"block": <Block JSON>, "payload": <pickled dict>}``, so a
retried task or a restarted actor redoes exactly one block and the sink writes each block
whole, once per attempt, under a name (or ids) that a repeat overwrites.
"""

from __future__ import annotations

import importlib
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.errors import LlaveError
from service.batch.sources import Block, Failure, Item, ReadOptions, read_block
from service.storage.errors import StoreError

# Errors that make one item a failure (anything else is a bug and fails the task).
_ITEM_ERRORS = (LlaveError, StoreError, ValueError, TypeError, OSError)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    checkpoint: str
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 32  # inputs per forward
    torch_threads: int | None = None  # CPU actors: threads of the forward
    # "module:function" called in each model actor with the JobSpec instead of
    # model.load_embedder (tests' fault injection; not a command-line option)
    embedder_factory: str | None = None


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """Everything a worker needs, plain and picklable."""

    model: ModelSpec
    read: ReadOptions
    sink: Any  # service.batch.sinks.SinkSpec
    source_options: dict[str, Any] | None = None  # make sources (thumbnails) with these options
    image_limits: dict[str, int] = field(default_factory=dict)  # model.load_* keyword arguments


def reason_of(exc: BaseException) -> str:
    """A short stable word for failures.jsonl: ``ImageDecodeError`` -> ``image_decode``."""
    name = type(exc).__name__.removesuffix("Error") or type(exc).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


_PREPROCESSORS: dict[Any, Any] = {}


def _preprocessor(job: JobSpec) -> Any:
    key = (job.model.checkpoint, tuple(sorted(job.image_limits.items())))
    if key not in _PREPROCESSORS:
        from model import load_preprocessor

        _PREPROCESSORS[key] = load_preprocessor(job.model.checkpoint, **job.image_limits)
    return _PREPROCESSORS[key]


def _source(item: Item, job: JobSpec) -> Any:
    from model.inputs import ImageLimits
    from service.storage.sources import source_of_input

    lim = job.image_limits
    limits = ImageLimits(
        max_pixels=lim["max_image_pixels"],
        max_images=lim["max_images_per_input"],
        max_bytes=lim["max_image_bytes"],
    )
    return source_of_input(item.input, job.source_options or {}, limits)


def prepare_block(row: dict[str, Any], job: JobSpec) -> dict[str, Any]:
    """Stage 1 (see the module docstring)."""
    started = time.perf_counter()
    block = Block.from_json(row["block"])
    pre = _preprocessor(job)
    out: dict[str, Any] = {"ids": [], "prepared": [], "metadata": [], "sources": [], "failures": []}
    seen: set[str] = set()
    for item in read_block(block, job.read):
        if isinstance(item, Failure):
            out["failures"].append(item.as_dict())
            continue
        if item.id in seen:
            out["failures"].append(
                Failure(item.where, "duplicate_id", "the id repeats in its block", item.id).as_dict()
            )
            continue
        seen.add(item.id)
        if job.read.instruction and "instruction" not in item.input:
            item.input["instruction"] = job.read.instruction
        try:
            prepared = pre.preprocess(item.input)
            source = _source(item, job) if job.source_options else None
        except _ITEM_ERRORS as exc:
            out["failures"].append(Failure(item.where, reason_of(exc), str(exc), item.id).as_dict())
            continue
        out["ids"].append(item.id)
        out["prepared"].append(prepared)
        out["metadata"].append(item.metadata)
        out["sources"].append(source)
    out["prepare_seconds"] = time.perf_counter() - started
    return {"block": row["block"], "payload": pickle.dumps(out, protocol=5)}


def load_model(job: JobSpec) -> Any:
    """The embedder of a model actor: ``model.load_embedder``, or the configured factory."""
    if job.model.embedder_factory:
        module, _, attr = job.model.embedder_factory.partition(":")
        return getattr(importlib.import_module(module), attr)(job)
    from model import load_embedder

    return load_embedder(
        job.model.checkpoint, device=job.model.device, dtype=job.model.dtype, **job.image_limits
    )


class EmbedBlocks:
    """Stage 2: one model per actor; Ray Data keeps a pool of them (``concurrency``)."""

    def __init__(self, job: JobSpec) -> None:
        started = time.perf_counter()
        import torch

        if job.model.torch_threads:
            torch.set_num_threads(job.model.torch_threads)
        self.job = job
        self.embedder = load_model(job)
        self.pid = os.getpid()
        self.load_seconds: float | None = time.perf_counter() - started  # reported once

    def _forward(self, prepared: list[Any]) -> np.ndarray:
        return self.embedder.postprocess(self.embedder.forward(prepared), normalize=False)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        payload = pickle.loads(row["payload"])
        prepared = payload.pop("prepared")
        started = time.perf_counter()
        pooled = np.zeros((len(prepared), self.embedder.dim), dtype=np.float32)
        failed: dict[int, BaseException] = {}
        order = sorted(range(len(prepared)), key=lambda i: prepared[i].cost)  # little padding
        size = self.job.model.batch_size
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            try:
                pooled[idx] = self._forward([prepared[i] for i in idx])
            except RuntimeError:  # e.g. out of device memory: one at a time finds the culprit
                for i in idx:
                    try:
                        pooled[[i]] = self._forward([prepared[i]])
                    except RuntimeError as exc:
                        failed[i] = exc
        payload["vectors"] = pooled
        payload["embed_failed"] = {i: (reason_of(e), str(e)) for i, e in failed.items()}
        payload["forward_seconds"] = time.perf_counter() - started
        payload["embedded_by"] = self.pid
        payload["actor_load_seconds"], self.load_seconds = self.load_seconds or 0.0, None
        return {"block": row["block"], "payload": pickle.dumps(payload, protocol=5)}


def finish_block(row: dict[str, Any], job: JobSpec) -> dict[str, Any]:
    """Stage 3 for sinks that take parallel writers: normalise, then write the block."""
    from service.batch.sinks import open_sink

    payload = pickle.loads(row["payload"])
    block = Block.from_json(row["block"])
    report = write_finished(block, payload, open_sink(job.sink))
    return {"block": row["block"], "payload": pickle.dumps(report, protocol=5)}


def write_finished(block: Block, payload: dict[str, Any], sink: Any) -> dict[str, Any]:
    """Normalise a block's vectors, drop the items that failed, write the rest in one piece;
    return the block's report (what the manifest records)."""
    from service.vectors import normalised_rows

    ids, vectors = payload["ids"], payload["vectors"]
    failures = list(payload["failures"])
    bad = dict(payload.get("embed_failed", {}))
    finite = np.isfinite(vectors).all(axis=1) & (np.abs(vectors).sum(axis=1) > 0)
    for i in np.flatnonzero(~finite):
        bad.setdefault(int(i), ("bad_embedding", "the model returned NaN, infinite or all-zero values"))
    keep = [i for i in range(len(ids)) if i not in bad]
    for i, (reason, message) in sorted(bad.items()):
        failures.append(Failure(ids[i], reason, message, ids[i]).as_dict())
    started = time.perf_counter()
    unit = normalised_rows(vectors[keep]) if keep else np.zeros((0, vectors.shape[1]), np.float32)
    written = sink.write(
        block.key,
        [ids[i] for i in keep],
        unit,
        [payload["metadata"][i] for i in keep],
        [payload["sources"][i] for i in keep],
    )
    return {
        "block": block.key,
        "items": len(keep),
        "failures": failures,
        "written": written,
        "prepare_seconds": payload.get("prepare_seconds", 0.0),
        "forward_seconds": payload.get("forward_seconds", 0.0),
        "write_seconds": time.perf_counter() - started,
        "actor_load_seconds": payload.get("actor_load_seconds", 0.0),
        "embedded_by": payload.get("embedded_by"),
    }
