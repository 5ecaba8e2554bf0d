"""The embedding engine: model lifecycle, preprocessing pool, batcher and device thread.

Routes (and any later route, e.g. collections and search) embed through the one engine
the app holds, so every caller shares the same batches and limits::

    engine: EmbeddingEngine = request.app.state.engine
    result = await engine.embed(inputs, truncate=True, normalize=True)
    result.embeddings   # numpy float32, shape (len(inputs), engine.dim), rows in input order
    result.usage        # {"prompt_tokens", "total_tokens", "images", "truncated"}
    result.timings      # {"preprocess_ms", "queue_ms", "inference_ms"}

``inputs`` is a list of input objects as plain dicts in the HTTP shapes (shorthand
``{"text"?, "image"?, "instruction"?}`` or ``{"content": [...], "instruction"?}``; an
image is base64, a ``data:`` URI, raw bytes, or an allow-listed ``http(s)://`` URL).
``embed`` raises the typed errors that ``service/http/errors.py`` maps to HTTP:
``UnavailableError`` (503: not ready yet, timed out, worker dead, shutting down),
``OverloadedError`` (429: queue full), ``PayloadTooLargeError`` (413: more inputs than the
queue holds), model-core ``LlaveError`` subclasses for bad inputs (422/413, with
``input_index`` set), ``InferenceError`` (500: the forward pass of the batch failed).
It does not enforce ``max_inputs_per_request`` (an HTTP-request limit the routes check),
so a caller with more inputs than ``max_queue`` must chunk them.

Flow of one call: admit its n inputs against ``--max-queue`` (429 at once when full) ->
fetch image URLs -> preprocess each input in the thread pool (overlapping the forward
pass of the batch on the device) -> queue the prepared inputs with their token cost ->
the batcher groups them with other callers' inputs -> forward + pooling on the device
thread -> rows back to their callers. The whole call is bounded by
``--request-timeout-s``; on timeout (or when the client goes away and the route cancels
the call) the inputs not yet on the device are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.http.errors import (
    ApiError,
    InferenceError,
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
    UnavailableError,
    from_model_error,
)
from service.inference.batching import (
    BatcherClosedError,
    BatchStats,
    Completed,
    DynamicBatcher,
    QueueFullError,
)
from service.inference.hardware import dtype_warning
from service.inference.images import ImageFetcher
from service.inference.worker import DeviceWorker, FatalDeviceError, WorkerDeadError, preprocess_pool
from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:  # the model core (and torch) is imported lazily, on the device thread
    from model.embedder import Embedder, PreparedInput

logger = logging.getLogger("llave.engine")


@dataclass(frozen=True)
class EmbedResult:
    """What ``EmbeddingEngine.embed`` returns."""

    embeddings: np.ndarray  # float32 (n, dim)
    usage: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class _Job:
    """One prepared input on its way through the batcher."""

    prepared: PreparedInput
    normalize: bool
    fault: str | None = None  # fault injection (testing only)


def _texts(inp: Mapping[str, Any]) -> list[str]:
    texts = [inp.get("text"), inp.get("instruction")]
    content = inp.get("content")
    if isinstance(content, list):
        texts.extend(part.get("text") for part in content if isinstance(part, dict))
    return [t for t in texts if isinstance(t, str)]


def _unrecoverable(exc: BaseException) -> bool:
    """Device errors after which every later kernel fails too (the process must restart)."""
    message = str(exc)
    return any(
        marker in message
        for marker in ("device-side assert", "illegal memory access", "unspecified launch failure")
    )


class EmbeddingEngine:
    """Owns the model, the device thread, the preprocessing pool and the batcher."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.state = "starting"  # -> loading -> warming -> ready | failed; stopped
        self.embedder: Embedder | None = None
        self.images = ImageFetcher(
            settings.image_url_allow_hosts,
            allow_private=settings.image_url_allow_private,
            max_bytes=settings.image_url_max_bytes,
            timeout_s=settings.image_url_timeout_s,
        )
        self._device = DeviceWorker()
        self._pool: ThreadPoolExecutor | None = None
        self._batcher: DynamicBatcher[_Job, np.ndarray] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._fault_kind, _, self._fault_marker = (settings.fault_injection or "").partition(":")
        self.metrics.worker_alive.set_function(lambda: float(self.alive))

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the threads and the batcher; load and warm the model in the background."""
        s = self.settings
        if s.fault_injection:
            logger.warning("FAULT INJECTION IS ON (%s): for tests only", s.fault_injection)
        self._pool = preprocess_pool(s.preprocess_workers)
        self._device.start()
        self._batcher = DynamicBatcher(
            self._run_batch,
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens,
            max_wait_s=s.max_wait_ms / 1000.0,
            max_queue=s.max_queue,
            sort_window=s.batch_sort_window,
            on_batch=self._observe_batch,
            on_queue_change=self.metrics.queue_inputs.set,
        )
        self._batcher.start()
        self._load_task = asyncio.create_task(self._load(), name="llave-load-model")

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self._batcher is not None:
            await self._batcher.stop()
        await asyncio.to_thread(self._device.stop)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        await self.images.aclose()
        self.state = "stopped"
        self.metrics.ready.set(0)

    async def _load(self) -> None:
        s = self.settings
        try:
            self.state = "loading"
            logger.info("loading model %s (device %s, dtype %s)", s.model, s.device, s.dtype)
            started = time.perf_counter()
            self.embedder = await self._device.run(self._load_model)
            loaded = time.perf_counter()
            slow_dtype = dtype_warning(self.embedder.device, self.embedder.dtype)
            if slow_dtype is not None:  # before the warm-up, which it would make very long
                logger.warning("%s", slow_dtype)
            interval = s.gil_switch_interval_s(str(self.embedder.device))
            if interval is not None:  # process-wide; see Settings.gil_switch_interval_ms
                sys.setswitchinterval(interval)
                logger.info("GIL switch interval set to %g ms", interval * 1000.0)
            self.state = "warming"
            n, tokens = await self._device.run(self._warmup)
            emb = self.embedder
            if s.max_batch_tokens < emb.max_length:
                logger.warning(
                    "max_batch_tokens (%d) is below the model's max length (%d): longer inputs run "
                    "alone, in batches larger than the warm-up's",
                    s.max_batch_tokens,
                    emb.max_length,
                )
            self.state = "ready"
            self.metrics.ready.set(1)
            logger.info(
                "model ready: %s on %s, dtype %s, dim %d, max length %d (loaded in %.1f s, "
                "warm-up of %d x %d tokens in %.1f s)",
                s.model,
                emb.device,
                emb.dtype,
                emb.dim,
                emb.max_length,
                loaded - started,
                n,
                tokens,
                time.perf_counter() - loaded,
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            self.state = "failed"
            logger.exception("loading or warming up the model failed; the server cannot embed")

    def _load_model(self) -> Embedder:  # device thread
        from model import load_embedder

        s = self.settings
        return load_embedder(
            s.model,
            device=s.device,
            dtype=s.dtype,
            max_length=s.max_input_tokens,
            max_image_pixels=s.max_image_pixels,
            max_images_per_input=s.max_images_per_input,
            attn_implementation=s.attn_implementation,
        )

    def _warmup(self) -> tuple[int, int]:  # device thread
        """One forward at the largest batch, so an out-of-memory shows at boot."""
        emb = self.embedder
        assert emb is not None
        s = self.settings
        n = s.max_batch_size
        tokens = max(1, min(s.warmup_tokens, s.max_batch_tokens // n, emb.max_length))
        batch = emb.warmup_inputs(n, tokens)
        emb.postprocess(emb.forward(batch))
        return n, max(p.cost for p in batch)

    # --- state -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.alive

    @property
    def alive(self) -> bool:
        """False when the device thread or the batcher died, or the model failed to load."""
        if self.state in ("failed", "stopped"):
            return False
        if self.state == "starting":
            return True
        return self._device.alive and self._batcher is not None and self._batcher.running

    @property
    def dim(self) -> int | None:
        return self.embedder.dim if self.embedder is not None else None

    def accepts_model_name(self, name: str) -> bool:
        """Whether ``name`` names the served model (for OpenAI's ``model`` field)."""
        s = self.settings
        names = {s.model_name, s.model, Path(s.model).name, s.model.rstrip("/").rsplit("/", 1)[-1]}
        if self.embedder is not None:
            names.add(self.embedder.name)
        return name in names

    def info(self) -> dict[str, Any]:
        s = self.settings
        emb = self.embedder
        limits = s.limits()
        if emb is not None:
            limits["max_input_tokens"] = emb.max_length
        return {
            "model": s.model_name,
            "status": self.state,
            "dim": emb.dim if emb else None,
            "dtype": emb.dtype if emb else s.dtype,
            "device": emb.device if emb else s.device,
            "max_length": emb.max_length if emb else None,
            "limits": limits,
            "batching": {
                "max_batch_size": s.max_batch_size,
                "max_batch_tokens": s.max_batch_tokens,
                "max_wait_ms": s.max_wait_ms,
                "batch_sort_window": s.batch_sort_window,
                "preprocess_workers": s.preprocess_workers,
            },
            "auth": s.api_key is not None,
        }

    def check_ready(self) -> None:
        if self.ready:
            return
        if not self.alive:
            raise UnavailableError("the model worker is not running")
        raise UnavailableError(
            f"the model is not ready yet ({self.state})", retry_after_s=self.settings.retry_after_s
        )

    # --- embedding ---------------------------------------------------------------------

    async def embed(
        self, inputs: Sequence[Mapping[str, Any]], *, truncate: bool = True, normalize: bool = True
    ) -> EmbedResult:
        """Embed input objects through the shared batcher; see the module docstring."""
        self.check_ready()
        assert self._batcher is not None and self.embedder is not None
        s = self.settings
        n = len(inputs)
        if n == 0:
            raise InvalidRequestError("no inputs given")
        if n > s.max_queue:
            raise PayloadTooLargeError(f"{n} inputs in one call; the queue holds at most {s.max_queue}")
        try:
            admission = self._batcher.admit(n)
        except QueueFullError:
            raise OverloadedError(
                "the server is at capacity; retry later", retry_after_s=s.retry_after_s
            ) from None
        except BatcherClosedError:
            raise UnavailableError("the server is shutting down") from None
        with admission:
            try:
                async with asyncio.timeout(s.request_timeout_s):
                    return await self._embed_admitted(admission, inputs, truncate, normalize)
            except TimeoutError:
                raise UnavailableError(
                    f"the request did not complete within {s.request_timeout_s:g} s; its work was dropped",
                    retry_after_s=s.retry_after_s,
                ) from None

    async def _embed_admitted(
        self, admission: Any, inputs: Sequence[Mapping[str, Any]], truncate: bool, normalize: bool
    ) -> EmbedResult:
        started = time.perf_counter()
        resolved = await self.images.resolve_inputs([dict(inp) for inp in inputs])
        prepared = await self._preprocess_all(resolved, truncate)
        preprocess_s = time.perf_counter() - started

        jobs = [
            (_Job(p, normalize, self._fault_for(inp)), p.cost)
            for p, inp in zip(prepared, resolved, strict=True)
        ]
        futures = admission.submit(jobs)
        try:
            done: list[Completed[np.ndarray]] = list(await asyncio.gather(*futures))
        except BaseException as exc:
            for fut in futures:
                fut.cancel()  # drop what has not reached the device yet
            if isinstance(exc, WorkerDeadError):
                raise UnavailableError("the model worker is not running") from None
            if isinstance(exc, BatcherClosedError):
                raise UnavailableError("the server is shutting down") from None
            mapped = from_model_error(exc)
            if mapped is not None:  # e.g. an input the forward pass refused
                raise mapped from None
            if not isinstance(exc, Exception) or isinstance(exc, ApiError):
                raise
            raise InferenceError(
                "the forward pass of the batch holding this request failed; the error was logged"
            ) from None

        for item in done:
            self.metrics.stage_seconds.labels(stage="queue").observe(item.queued_s)
        batches = {item.batch.batch_id: item.batch for item in done}
        embeddings = np.stack([item.value for item in done]).astype(np.float32, copy=False)
        if not np.isfinite(embeddings).all():  # e.g. a float16 overflow: never answer or store these
            raise InferenceError(
                "the model produced non-finite values (NaN or infinity) for this request; "
                "serving with --dtype bfloat16 or float32 avoids float16 overflow"
            )
        tokens = sum(p.cost for p in prepared)
        return EmbedResult(
            embeddings=embeddings,
            usage={
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "images": sum(p.num_images for p in prepared),
                "truncated": sum(1 for p in prepared if p.truncated),
            },
            timings={
                "preprocess_ms": preprocess_s * 1000.0,
                "queue_ms": max(item.queued_s for item in done) * 1000.0,
                "inference_ms": sum(b.run_s for b in batches.values()) * 1000.0,
            },
        )

    async def _preprocess_all(
        self, inputs: Sequence[Mapping[str, Any]], truncate: bool
    ) -> list[PreparedInput]:
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, self._preprocess_one, inp, truncate) for inp in inputs]
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            for fut in futures:
                fut.cancel()
            raise
        for index, result in enumerate(results):
            if isinstance(result, BaseException):
                result.input_index = index  # type: ignore[attr-defined]
                mapped = from_model_error(result)
                if mapped is not None:
                    raise mapped from None
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    def _preprocess_one(self, inp: Mapping[str, Any], truncate: bool) -> PreparedInput:  # pool thread
        assert self.embedder is not None
        started = time.perf_counter()
        prepared = self.embedder.preprocess(inp, truncate=truncate)
        self.metrics.stage_seconds.labels(stage="preprocess").observe(time.perf_counter() - started)
        return prepared

    def _fault_for(self, inp: Mapping[str, Any]) -> str | None:
        if self._fault_marker and any(self._fault_marker in t for t in _texts(inp)):
            return self._fault_kind
        return None

    async def _run_batch(self, jobs: list[_Job]) -> list[np.ndarray]:
        return await self._device.run(self._forward, jobs)

    def _forward(self, jobs: list[_Job]) -> list[np.ndarray]:  # device thread
        emb = self.embedder
        assert emb is not None
        try:
            faults = {job.fault for job in jobs}
            if "kill-worker" in faults:
                raise FatalDeviceError("injected fault: kill-worker (LLAVE_FAULT_INJECTION)")
            if "fail-batch" in faults:
                raise RuntimeError("injected fault: fail-batch (LLAVE_FAULT_INJECTION)")
            pooled = emb.forward([job.prepared for job in jobs])
            normed = emb.postprocess(pooled, normalize=True) if any(j.normalize for j in jobs) else None
            raw = emb.postprocess(pooled, normalize=False) if not all(j.normalize for j in jobs) else None
            return [
                (normed if job.normalize else raw)[row]  # type: ignore[index]
                for row, job in enumerate(jobs)
            ]
        except Exception as exc:
            if from_model_error(exc) is not None:
                raise  # an input error, not a device failure: no trace in the log
            if _unrecoverable(exc):
                raise FatalDeviceError(f"unrecoverable device error: {type(exc).__name__}") from exc
            logger.exception("forward pass failed for a batch of %d inputs", len(jobs))
            if type(exc).__name__ == "OutOfMemoryError":
                torch = sys.modules.get("torch")
                if torch is not None and torch.cuda.is_available():
                    torch.cuda.empty_cache()
            raise

    def _observe_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.batch_tokens.observe(stats.padded_tokens)
        self.metrics.stage_seconds.labels(stage="inference").observe(stats.run_s)
