"""The front end's side of the engines: preprocessing here, the forward pass over IPC.

Routes embed through ``EngineClient.embed``::

    result = await engine.embed(inputs, truncate=True, normalize=True)
    result.embeddings   # numpy float32 (len(inputs), engine.dim), rows in input order
    result.usage        # {"prompt_tokens", "total_tokens", "images", "videos", "truncated"}
    result.timings      # {"preprocess_ms", "queue_ms", "inference_ms"}

``inputs`` are input objects as plain dicts in the HTTP shapes. Flow of one call: admit
its n inputs against this front end's share of ``max_queue`` (never below
``max_inputs_per_request``; each engine admits against the whole queue again) and its
images' largest possible crops against the front end's pixel budget (``max_pixel_bytes``)
(``EngineOverloadedError`` at once when either is full) -> fetch image URLs -> decode,
tile and tokenise each input in this process's thread pool -> the pixel reservation
shrinks to the crops' real size -> put the pixels in shared memory (under a random name)
and drop this process's copy -> one message to the least loaded engine (one per device;
``connection.py``), which batches the inputs with every front end's -> raw pooled rows
back -> normalised here (``service.vectors``). A request is never split between engines:
its inputs are batched together as on one device. When its engine dies with the request
in flight, it is sent once to another ready engine (embedding is idempotent; its pixels
are still in shared memory) before any 503. The whole call is bounded by
``request_timeout_s``; when it runs out or the caller is cancelled (the client went
away) the engine is told to drop the inputs not yet on the device.

Errors (``service/inference/errors.py``; the HTTP layer maps them): not ready / engine
dead / timed out / shutting down -> ``EngineUnavailableError``; queue full ->
``EngineOverloadedError``; more inputs than the queue holds -> ``TooManyInputsError``;
images that could never fit the pixel budget -> ``PixelsTooLargeError``; bad inputs ->
``model.errors`` input errors with ``input_index``; failed forward ->
``ForwardError``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.budget import ByteBudget
from service.inference import ipc
from service.inference.config import EngineConfig
from service.inference.connection import EngineConnection
from service.inference.engine import EngineInfo
from service.inference.errors import (
    EngineDiedError,
    EngineOverloadedError,
    EngineUnavailableError,
    ForwardError,
    NoInputsError,
    PixelsTooLargeError,
    PreprocessError,
    TooManyInputsError,
)
from service.inference.images import ImageFetcher
from service.metrics import Metrics
from service.storage.errors import InvalidVectorError
from service.vectors import normalised_rows

logger = logging.getLogger("llave.client")


@dataclass(frozen=True)
class EmbedResult:
    embeddings: np.ndarray  # float32 (n, dim)
    usage: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)


class EngineClient:
    """One front end's connection to the server's engines (one per device)."""

    def __init__(
        self,
        config: EngineConfig,
        engines: Sequence[tuple[str, str, str]],
        images: ImageFetcher,
        metrics: Metrics | None = None,
        *,
        queue_share: int | None = None,
        served_names: Sequence[str] = (),
        require_all: bool = False,
    ) -> None:
        """``engines``: (address, status board path, device) of each engine."""
        if not engines:
            raise ValueError("no engines to connect to")
        self.config = config
        self.images = images
        self.metrics = metrics or Metrics()
        self.queue_share = queue_share or config.max_queue
        self.pixels = ByteBudget(config.max_pixel_bytes, self.metrics.pixel_bytes)  # decoded crops held here
        self.served_names = set(served_names)
        self.require_all = require_all
        self.connections = [
            EngineConnection(i, address, board, device, on_change=self._update_gauges)
            for i, (address, board, device) in enumerate(engines)
        ]
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight = 0
        self._turn = 0  # rotates the first engine looked at, so ties take turns
        self._gauges: tuple[float, float] = (-1.0, -1.0)
        run_dir = Path(engines[0][1]).parent.name
        self._segment_prefix = f"llave-{run_dir}-{os.getpid()}"

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        for connection in self.connections:
            await connection.start(self._ctx)
        self._pool = ThreadPoolExecutor(self.config.preprocess_workers, thread_name_prefix="llave-preprocess")
        # The preprocessor the engine sends once it is ready unpickles into the model core
        # (torch, transformers): import those now, while the engine loads, not after it.
        self._pool.submit(importlib.import_module, "model.embedder")

    async def stop(self) -> None:
        for connection in self.connections:
            connection.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        await self.images.aclose()
        self._ctx.term()

    def _update_gauges(self) -> None:
        gauges = (1.0 if self.ready else 0.0, 1.0 if self.alive else 0.0)
        if gauges != self._gauges:  # written on change only (they are shared files)
            self._gauges = gauges
            self.metrics.ready.set(gauges[0])
            self.metrics.worker_alive.set(gauges[1])

    # --- state -------------------------------------------------------------------------

    def _count(self, serving: list[bool]) -> bool:
        return all(serving) if self.require_all else any(serving)

    @property
    def engine(self) -> EngineInfo | None:
        """The model's facts, from any engine that has said hello (all serve the same model)."""
        ready = next((c.engine for c in self.connections if c.ready), None)
        return ready or next((c.engine for c in self.connections if c.engine is not None), None)

    @property
    def state(self) -> str:
        """The state of the server's model: the best state among its engines (with
        ``require_all``, the worst)."""
        states = [c.state for c in self.connections]
        order = ("ready", "warming", "loading", "starting", "restarting", "dead", "stopped", "failed")
        ranked = sorted(states, key=order.index)
        return ranked[-1] if self.require_all else ranked[0]

    @property
    def ready(self) -> bool:
        return self._count([c.ready for c in self.connections])

    @property
    def alive(self) -> bool:
        """False when no engine runs (with ``require_all``: when any does not): ``/health`` 503."""
        return self._count([c.alive for c in self.connections])

    @property
    def dim(self) -> int | None:
        engine = self.engine
        return engine.dim if engine is not None else None

    def devices(self) -> list[dict[str, Any]]:
        """Each engine's index, device and state (``/health``, ``/ready``, ``/info``)."""
        return [c.describe() for c in self.connections]

    def accepts_model_name(self, name: str) -> bool:
        names = set(self.served_names) | {self.config.model, Path(self.config.model).name}
        names.add(self.config.model.rstrip("/").rsplit("/", 1)[-1])
        if self.engine is not None:
            names.add(self.engine.name)
        return name in names

    def check_ready(self) -> None:
        if any(c.ready for c in self.connections):
            return
        states = {c.board_state for c in self.connections}
        if states <= {ipc.FAILED, ipc.STOPPED}:
            raise EngineUnavailableError("the model engine is not running", retry=False)
        if states & {ipc.DEAD, ipc.RESTARTING}:
            raise EngineUnavailableError("the model engine stopped; it is being restarted")
        raise EngineUnavailableError(f"the model is not ready yet ({self.state})")

    def describe(self) -> dict[str, Any]:
        """Model facts for ``/info`` (None until an engine is ready)."""
        e = self.engine
        return {
            "status": self.state,
            "dim": e.dim if e else None,
            "dtype": e.dtype if e else self.config.dtype,
            "device": ",".join(c.resolved_device for c in self.connections),
            "max_length": e.max_length if e else None,
        }

    def _pick(self, tried: Sequence[EngineConnection]) -> EngineConnection | None:
        """The ready engine, not yet tried for this request, with the fewest queued tokens."""
        n = len(self.connections)
        start = self._turn
        self._turn = (self._turn + 1) % n
        best: EngineConnection | None = None
        best_load = 0
        for k in range(n):
            connection = self.connections[(start + k) % n]
            if connection in tried or not connection.ready:
                continue
            load = connection.load()
            if best is None or load < best_load:
                best, best_load = connection, load
        return best

    # --- embedding ---------------------------------------------------------------------

    async def embed(
        self, inputs: Sequence[Mapping[str, Any]], *, truncate: bool = True, normalize: bool = True
    ) -> EmbedResult:
        self.check_ready()
        c = self.config
        n = len(inputs)
        if n == 0:
            raise NoInputsError("no inputs given")
        if n > c.max_queue:
            raise TooManyInputsError(f"{n} inputs in one call; the queue holds at most {c.max_queue}")
        if self._in_flight + n > self.queue_share:
            raise EngineOverloadedError("the server is at capacity; retry later")
        pixels = self._pixel_bound(inputs)
        if pixels > c.max_pixel_bytes:
            raise PixelsTooLargeError(
                f"the images of this request may decode to {pixels} bytes of pixels, more than a "
                f"front end holds ({c.max_pixel_bytes}, --max-pixel-bytes); send fewer images per request"
            )
        if not self.pixels.take(pixels):
            raise EngineOverloadedError("the server is decoding as many images as it holds; retry later")
        held = [pixels]  # bytes of the pixel budget this call holds (shrinks after decoding)
        self._in_flight += n
        self.metrics.queue_inputs.inc(n)
        try:
            async with asyncio.timeout(c.request_timeout_s):
                return await self._embed(inputs, truncate, normalize, held)
        except TimeoutError:
            raise EngineUnavailableError(
                f"the request did not complete within {c.request_timeout_s:g} s; its work was dropped"
            ) from None
        finally:
            self.pixels.give_back(held[0])
            self._in_flight -= n
            self.metrics.queue_inputs.dec(n)

    def _pixel_bound(self, inputs: Sequence[Mapping[str, Any]]) -> int:
        """The most bytes of float32 crops the images and videos of ``inputs`` can decode
        to: each image gives at most a base crop plus the largest grid of the model's
        pinpoints, each video at most its sampling's most frames, one crop each."""
        pre = self.engine.preprocessor if self.engine is not None else None
        crop, pinpoints = getattr(pre, "crop", None), getattr(pre, "grid_pinpoints", None)
        if not crop or not pinpoints:
            return 0  # a model without anyres images (test doubles): nothing to bound
        crops = 1 + max((int(h) // crop) * (int(w) // crop) for h, w in pinpoints)
        frames = pre.config.video_sampling.max_frames  # type: ignore[union-attr]
        images, videos = count_images(inputs), count_images(inputs, "video")
        return (images * crops + videos * frames) * 3 * crop * crop * 4

    def _hold_exactly(self, held: list[int], nbytes: int) -> None:
        """Shrink (or, were the bound ever short, grow) this call's pixel reservation."""
        if nbytes <= held[0]:
            self.pixels.give_back(held[0] - nbytes)
        elif not self.pixels.take(nbytes - held[0]):
            raise EngineOverloadedError("the server is decoding as many images as it holds; retry later")
        held[0] = nbytes

    async def _embed(
        self, inputs: Sequence[Mapping[str, Any]], truncate: bool, normalize: bool, held: list[int]
    ) -> EmbedResult:
        started = time.perf_counter()
        resolved = await self.images.resolve_inputs([dict(inp) for inp in inputs])
        prepared = await self._preprocess_all(resolved, truncate)
        preprocess_s = time.perf_counter() - started
        if self.engine is None:
            self.check_ready()
        self._hold_exactly(
            held, sum(int(p.pixel_values.nbytes) for p in prepared if p.pixel_values is not None)
        )
        segment, slots = ipc.put_pixels([p.pixel_values for p in prepared], self._segment_prefix)
        for p in prepared:  # the engine reads the shared copy: free this process's one now
            p.pixel_values = None
        header = {
            "shm": segment.name if segment is not None else None,
            "items": [
                (p.input_ids, p.image_sizes, slot, p.cut_image_tokens, p.video_frames)
                for p, slot in zip(prepared, slots, strict=True)
            ],
        }
        tokens = sum(p.cost for p in prepared)
        try:
            engine, reply, data = await self._send(header, tokens)
        finally:
            ipc.release(segment, unlink=True)
        rows = np.frombuffer(data, dtype=np.float32).reshape(len(prepared), engine.dim)
        if normalize:
            try:
                rows = normalised_rows(rows, what="embedding")
            except InvalidVectorError:
                raise ForwardError(
                    "the model produced non-finite values (NaN or infinity) for this request; "
                    "serving with --dtype bfloat16 or float32 avoids float16 overflow"
                ) from None
        elif not np.isfinite(rows).all():
            raise ForwardError(
                "the model produced non-finite values (NaN or infinity) for this request; "
                "serving with --dtype bfloat16 or float32 avoids float16 overflow"
            )
        self.metrics.stage_seconds.labels(stage="queue").observe(reply["queue_ms"] / 1000.0)
        return EmbedResult(
            embeddings=np.array(rows, dtype=np.float32),
            usage={
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "images": sum(p.num_images - p.num_videos for p in prepared),
                "videos": sum(p.num_videos for p in prepared),
                "truncated": sum(1 for p in prepared if p.truncated),
            },
            timings={
                "preprocess_ms": preprocess_s * 1000.0,
                "queue_ms": reply["queue_ms"],
                "inference_ms": reply["inference_ms"],
            },
        )

    async def _send(self, header: dict[str, Any], tokens: int) -> tuple[EngineInfo, dict[str, Any], bytes]:
        """One request to the least loaded engine; once more to another if that one dies."""
        tried: list[EngineConnection] = []
        while True:
            connection = self._pick(tried)
            if connection is None:
                if tried:  # no other engine to retry on
                    raise EngineDiedError()
                self.check_ready()
                raise EngineUnavailableError("the model engine is not ready")
            engine = connection.engine
            assert engine is not None
            tried.append(connection)
            try:
                reply, data = await connection.request(header, tokens)
            except EngineDiedError:
                if len(tried) > 1:
                    raise
                logger.warning(
                    "engine %d (%s) died with a request in flight; sending it to another engine",
                    connection.index,
                    connection.device,
                )
                continue
            return engine, reply, data

    async def _preprocess_all(self, inputs: Sequence[Mapping[str, Any]], truncate: bool) -> list[Any]:
        """Preprocess every input in the pool; the first failure fails the call at once
        (the inputs not started yet are cancelled)."""
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, self._preprocess_one, inp, truncate) for inp in inputs]
        try:
            await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()
            raise
        failed = [(i, f) for i, f in enumerate(futures) if f.done() and f.exception() is not None]
        if failed:
            for f in futures:
                f.cancel()
            index, fut = failed[0]
            error = fut.exception()
            assert error is not None
            error.input_index = index  # type: ignore[attr-defined]
            raise error
        return [f.result() for f in futures]

    def _preprocess_one(self, inp: Mapping[str, Any], truncate: bool) -> Any:  # pool thread
        engine = self.engine
        if engine is None:
            raise EngineUnavailableError("the model engine stopped; it is being restarted")
        started = time.perf_counter()
        try:
            prepared = engine.preprocessor.preprocess(inp, truncate=truncate)
        except BaseException as exc:
            raise _preprocess_failure(exc) from None
        self.metrics.stage_seconds.labels(stage="preprocess").observe(time.perf_counter() - started)
        return prepared


def count_images(inputs: Sequence[Mapping[str, Any]], kind: str = "image") -> int:
    """Images (or videos: ``kind``) in ``inputs`` (HTTP shapes: ``image``, or ``content``
    parts of type image), counted before anything is decoded; malformed inputs count none
    (preprocessing refuses them with their own message)."""
    total = 0
    for inp in inputs:
        if not isinstance(inp, Mapping):
            continue
        total += inp.get(kind) is not None
        content = inp.get("content")
        if isinstance(content, list):
            total += sum(1 for part in content if isinstance(part, Mapping) and part.get("type") == kind)
    return total


def _preprocess_failure(exc: BaseException) -> Exception:
    """What a failed preprocessing raises to the event loop, whatever ``exc`` was.

    Input errors stay as they are (the caller's 4xx). Anything else is a bug: logged here
    and replaced by a ``PreprocessError``, because some exceptions cannot cross into
    asyncio at all: a ``StopIteration`` cannot be set on a future (the ``gather`` waiting
    for it would never finish), and a ``BaseException`` such as ``KeyboardInterrupt`` or
    ``SystemExit`` would stop the front end's event loop."""
    from model.errors import InvalidInputError

    if isinstance(exc, InvalidInputError):
        return exc
    logger.error("preprocessing an input failed unexpectedly", exc_info=exc)
    return PreprocessError(
        f"preprocessing this input failed unexpectedly ({type(exc).__name__}); the error was logged"
    )
