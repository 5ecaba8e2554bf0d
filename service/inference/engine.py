"""The engine process: one per device. It owns the model, the dynamic batcher and the
forward pass, and nothing else runs on its interpreter: no HTTP, no JSON, no image
decoding, no tokenising. Front ends (``service/inference/client.py``) send inputs already
tokenised and tiled; pixels arrive in shared memory; pooled vectors go back as raw
float32 (``service/inference/ipc.py``).

Inside the process: an asyncio loop receives requests and forms batches
(``service/inference/batching.py``), and one device thread (``worker.py``) loads the model
and runs every forward pass, so the loop keeps receiving (and refusing, when the queue is
full) while a batch computes.

Lifecycle, written to the status board for every front end to see: ``loading`` ->
``warming`` -> ``ready``; ``failed`` when the model cannot load (the supervisor does not
restart it: it would fail again). When the device thread dies (an unrecoverable device
error), the process exits with ``EXIT_DEVICE_DEAD`` and its supervisor
(``service/inference/supervisor.py``) marks it dead and restarts it or gives up. On
SIGTERM it refuses new work, finishes what it holds, and exits.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from service.gcfreeze import freeze_long_lived
from service.inference import ipc
from service.inference.batching import BatcherClosedError, BatchStats, DynamicBatcher, QueueFullError
from service.inference.config import EngineConfig
from service.inference.errors import (
    EngineDiedError,
    EngineOverloadedError,
    EngineUnavailableError,
    ForwardError,
)
from service.inference.hardware import dtype_warning
from service.inference.worker import DeviceWorker, FatalDeviceError, WorkerDeadError

if TYPE_CHECKING:  # the model core (and torch) is imported on the device thread
    from model.embedder import Embedder, PreparedInput

logger = logging.getLogger("llave.engine")

EXIT_DEVICE_DEAD = 70  # the device thread died: restart the process
EXIT_LOAD_FAILED = 71  # the model could not be loaded: restarting would not help
CUDA_GIL_SWITCH_INTERVAL_MS = 0.1


def gil_switch_interval_s(configured_ms: float | None, device: str) -> float | None:
    """The switch interval to set once the model is on ``device`` (None: leave Python's).

    On CUDA the device thread launches hundreds of kernels per forward pass, re-taking the
    interpreter lock after each; with Python's 5 ms interval it would queue behind the
    engine's event loop (measured: bench/README.md)."""
    if configured_ms is not None:
        return configured_ms / 1000.0
    return CUDA_GIL_SWITCH_INTERVAL_MS / 1000.0 if device.startswith("cuda") else None


def _unrecoverable(exc: BaseException) -> bool:
    """Device errors after which every later kernel fails too (the process must restart)."""
    message = str(exc)
    return any(
        marker in message
        for marker in ("device-side assert", "illegal memory access", "unspecified launch failure")
    )


def _is_input_error(exc: BaseException) -> bool:
    from model.errors import InvalidInputError

    return isinstance(exc, InvalidInputError)


def load_model(config: EngineConfig) -> Any:
    """The embedder this engine serves: ``model.load_embedder``, or the configured factory."""
    if config.cpu_threads is not None:  # several engines share the CPU: split its cores
        import torch

        torch.set_num_threads(config.cpu_threads)
    if config.embedder_factory:
        module, _, attr = config.embedder_factory.partition(":")
        return getattr(importlib.import_module(module), attr)(config)
    from model import load_embedder

    return load_embedder(
        config.model,
        device=config.device,
        dtype=config.dtype,
        max_length=config.max_input_tokens,
        attn_implementation=config.attn_implementation,
        **config.image_limit_kwargs(),
    )


@dataclass(frozen=True)
class EngineInfo:
    """What a front end learns from the engine once it is ready (``hello``)."""

    name: str
    dim: int
    max_length: int
    device: str
    dtype: str
    preprocessor: Any  # model.embedder.Preprocessor (pickled across)
    generation: int


class EngineCore:
    """Model, device thread and batcher of one engine process."""

    def __init__(self, config: EngineConfig, board: ipc.StatusBoard | None = None) -> None:
        self.config = config
        self.board = board
        self.state = ipc.STARTING
        self.embedder: Embedder | None = None
        self.device = DeviceWorker()
        self.batcher: DynamicBatcher[PreparedInput, np.ndarray] = DynamicBatcher(
            self._run_batch,
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_wait_s=config.max_wait_ms / 1000.0,
            max_queue=config.max_queue,
            sort_window=config.batch_sort_window,
            on_batch=self._observe_batch,
        )
        self.metrics: Any = None  # service.metrics.Metrics, when the process exports metrics
        self.isolations = 0  # failed batches run again by halves
        self.labels = {"engine": str(config.index), "device": config.device}

    def export_state(self) -> None:
        """This engine's own series, labelled with its index and device, from now on."""
        if self.metrics is None:
            return
        if self.embedder is not None:
            self.labels["device"] = str(self.embedder.device)
        self.metrics.batches.labels(**self.labels)
        self.metrics.engine_queue_inputs.labels(**self.labels).set(0)
        self.metrics.engine_ready.labels(**self.labels).set(1.0 if self.state == ipc.READY else 0.0)

    def _set_state(self, state: int) -> None:
        self.state = state
        if self.board is not None:
            self.board.write(state)

    async def start(self) -> None:
        self.device.start()
        self.batcher.start()
        await self._load()

    async def stop(self) -> None:
        await self.batcher.stop()
        await asyncio.to_thread(self.device.stop)

    async def _load(self) -> None:
        c = self.config
        self._set_state(ipc.LOADING)
        logger.info("loading model %s (device %s, dtype %s)", c.model, c.device, c.dtype)
        started = time.perf_counter()
        self.embedder = await self.device.run(load_model, c)
        loaded = time.perf_counter()
        emb = self.embedder
        slow_dtype = dtype_warning(emb.device, emb.dtype)
        if slow_dtype is not None:  # before the warm-up, which it would make very long
            logger.warning("%s", slow_dtype)
        interval = gil_switch_interval_s(c.gil_switch_interval_ms, str(emb.device))
        if interval is not None:  # the device thread re-takes the GIL after kernel launches
            sys.setswitchinterval(interval)
        self._set_state(ipc.WARMING)
        n, tokens = await self.device.run(self._warmup)
        if c.max_batch_tokens < emb.max_length:
            logger.warning(
                "max_batch_tokens (%d) is below the model's max length (%d): longer inputs run "
                "alone, in batches larger than the warm-up's",
                c.max_batch_tokens,
                emb.max_length,
            )
        freeze_long_lived()  # the model, loaded and warm, is kept for the process's life
        self._set_state(ipc.READY)
        logger.info(
            "model ready: %s on %s, dtype %s, dim %d, max length %d (loaded in %.1f s, "
            "warm-up of %d x %d tokens in %.1f s)",
            c.model,
            emb.device,
            emb.dtype,
            emb.dim,
            emb.max_length,
            loaded - started,
            n,
            tokens,
            time.perf_counter() - loaded,
        )

    def _warmup(self) -> tuple[int, int]:  # device thread
        """One forward at the largest batch, so an out-of-memory shows at boot."""
        emb = self.embedder
        assert emb is not None
        c = self.config
        n = c.max_batch_size
        tokens = max(1, min(c.warmup_tokens, c.max_batch_tokens // n, emb.max_length))
        batch = emb.warmup_inputs(n, tokens)
        emb.forward(batch)
        return n, max(p.cost for p in batch)

    def info(self, generation: int) -> EngineInfo:
        emb = self.embedder
        assert emb is not None
        return EngineInfo(
            name=emb.name,
            dim=emb.dim,
            max_length=emb.max_length,
            device=str(emb.device),
            dtype=str(emb.dtype),
            preprocessor=emb.preprocessor,
            generation=generation,
        )

    @property
    def alive(self) -> bool:
        return self.device.alive and self.batcher.running

    # --- the forward pass ------------------------------------------------------------

    async def _run_batch(self, batch: list[PreparedInput]) -> list[np.ndarray | Exception]:
        """Rows for a batch; when its forward pass fails, its halves are run again (and so
        on down to single inputs), so that only the inputs that fail on their own fail:
        one poisoned input never costs the others batched with it their answer."""
        try:
            return list(await self.device.run(self._forward, batch))
        except WorkerDeadError:
            raise
        except Exception as exc:
            if len(batch) == 1:
                if not _is_input_error(exc):
                    logger.error("the forward pass failed for one input", exc_info=exc)
                return [exc]
            self.isolations += 1
            if self.metrics is not None:
                self.metrics.forward_isolations.inc()
            logger.warning(
                "the forward pass of a batch of %d inputs failed (%s); running it again by halves "
                "to find the inputs that fail",
                len(batch),
                type(exc).__name__,
            )
            half = len(batch) // 2
            return await self._run_batch(batch[:half]) + await self._run_batch(batch[half:])

    def _forward(self, batch: list[PreparedInput]) -> np.ndarray:  # device thread
        emb = self.embedder
        assert emb is not None
        try:
            pooled = emb.forward(batch)
            # To host memory as float32; normalising is the front end's (a CPU stage).
            return pooled.float().cpu().numpy()
        except Exception as exc:
            if _is_input_error(exc):
                raise  # an input error, not a device failure: no trace in the log
            if _unrecoverable(exc):
                raise FatalDeviceError(f"unrecoverable device error: {type(exc).__name__}") from exc
            if type(exc).__name__ == "OutOfMemoryError":
                torch = sys.modules.get("torch")
                if torch is not None and torch.cuda.is_available():
                    torch.cuda.empty_cache()
            raise

    def _observe_batch(self, stats: BatchStats) -> None:
        if self.metrics is not None:
            self.metrics.batches.labels(**self.labels).inc()
            self.metrics.batch_size.observe(stats.size)
            self.metrics.batch_tokens.observe(stats.padded_tokens)
            self.metrics.stage_seconds.labels(stage="inference").observe(stats.run_s)

    # --- one request -------------------------------------------------------------------

    async def embed(self, items: Sequence[PreparedInput]) -> tuple[np.ndarray, dict[str, float]]:
        """Pooled float32 rows for prepared inputs, through the shared batcher."""
        if self.state != ipc.READY:
            raise EngineUnavailableError(f"the model is not ready yet ({ipc.STATE_NAMES[self.state]})")
        try:
            with self.batcher.admit(len(items)) as admission:
                futures = admission.submit([(p, p.cost) for p in items])
        except QueueFullError:
            raise EngineOverloadedError("the server is at capacity; retry later") from None
        except BatcherClosedError:
            raise EngineUnavailableError("the model engine is shutting down") from None
        try:
            done = await asyncio.gather(*futures)
        except BaseException as exc:
            for fut in futures:
                fut.cancel()  # drop what has not reached the device yet
            if isinstance(exc, WorkerDeadError):
                # Said on the board before the answer leaves: whoever reads this 503 and
                # then asks /health must already see the engine dead.
                self._set_state(ipc.DEAD)
                raise EngineDiedError() from None
            if isinstance(exc, BatcherClosedError):
                raise EngineUnavailableError("the model engine is shutting down") from None
            if isinstance(exc, Exception) and not _is_input_error(exc):
                raise ForwardError(
                    "the forward pass failed for an input of this request; the error was logged"
                ) from None
            raise
        rows = np.stack([item.value for item in done]).astype(np.float32, copy=False)
        batches = {item.batch.batch_id: item.batch for item in done}
        timings = {
            "queue_ms": max(item.queued_s for item in done) * 1000.0,
            "inference_ms": sum(b.run_s for b in batches.values()) * 1000.0,
        }
        return rows, timings


# --- the process -------------------------------------------------------------------------


def _prepared(header: dict[str, Any], segment: Any) -> list[PreparedInput]:
    from model.embedder import PreparedInput

    out = []
    for ids, sizes, slot, cut_image_tokens, video_frames in header["items"]:
        pixels = ipc.view_pixels(segment, slot) if slot is not None else None
        out.append(
            PreparedInput(
                input_ids=ids,
                pixel_values=pixels,
                image_sizes=sizes,
                cut_image_tokens=cut_image_tokens,
                video_frames=video_frames,
            )
        )
    return out


class EngineServer:
    """The engine process's message loop around an ``EngineCore``."""

    def __init__(self, config: EngineConfig, address: str, board_path: str, generation: int) -> None:
        self.config = config
        self.address = address
        self.generation = generation
        self.board = ipc.StatusBoard(board_path)
        self.core = EngineCore(config, self.board)
        self.tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self.draining = False
        self.parent_pid = os.getppid()
        self.queued = [0, 0]  # tokens, inputs: admitted here and not yet answered

    def _add_load(self, tokens: int, inputs: int) -> None:
        """Keep the board's load (front ends route by it) and the queue gauge current."""
        self.queued[0] += tokens
        self.queued[1] += inputs
        self.board.set_load(*self.queued)
        if self.core.metrics is not None:
            self.core.metrics.engine_queue_inputs.labels(**self.core.labels).set(self.queued[1])

    async def run(self) -> int:
        import zmq
        import zmq.asyncio

        from service.metrics import Metrics, exporting_across_processes

        if exporting_across_processes():
            self.core.metrics = Metrics()
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.address)
        self.sock = sock
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        receiver = asyncio.create_task(self._receive())
        self.board.set_load(0, 0)  # a restarted engine holds nothing of its predecessor's
        try:
            await self.core.start()
            self.core.export_state()
        except Exception:
            logger.exception("loading or warming up the model failed; the engine cannot embed")
            self.board.write(ipc.FAILED)
            receiver.cancel()
            sock.close()
            return EXIT_LOAD_FAILED
        watch = asyncio.create_task(stop.wait())
        while not watch.done():
            if os.getppid() != self.parent_pid:
                logger.critical("the server process is gone; the engine process exits")
                os._exit(EXIT_DEVICE_DEAD)
            if not self.core.alive:
                logger.critical("the device thread died; the engine process exits to be restarted")
                self.board.write(ipc.DEAD)
                sock.close()
                os._exit(EXIT_DEVICE_DEAD)  # nothing left to clean: the device is unusable
            await asyncio.wait({watch}, timeout=0.05)
        # SIGTERM: refuse new work, finish what is queued, then go.
        self.draining = True
        pending = [t for t in self.tasks.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=30)
        receiver.cancel()
        await self.core.stop()
        self.board.write(ipc.STOPPED)
        sock.close()
        ctx.term()
        return 0

    async def _receive(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=True)
            ident, kind = frames[0], frames[1]
            if kind == ipc.EMBED:
                header = ipc.load(frames[2])
                key = (ident, header["id"])
                task = asyncio.create_task(self._embed(ident, header))
                self.tasks[key] = task
                task.add_done_callback(lambda _t, key=key: self.tasks.pop(key, None))
            elif kind == ipc.CANCEL:
                task = self.tasks.get((ident, ipc.load(frames[2])))
                if task is not None:
                    task.cancel()
            elif kind == ipc.HELLO:
                if self.core.state == ipc.READY:
                    await self.sock.send_multipart(
                        [ident, ipc.HELLO, ipc.dump(self.core.info(self.generation))]
                    )
                else:
                    await self.sock.send_multipart([ident, ipc.HELLO, ipc.dump(None)])

    async def _embed(self, ident: bytes, header: dict[str, Any]) -> None:
        request_id = header["id"]
        try:
            segment = ipc.open_pixels(header["shm"]) if header.get("shm") else None
        except FileNotFoundError:  # the front end gave up and unlinked it already
            return
        try:
            if self.draining:
                raise EngineUnavailableError("the model engine is shutting down")
            items = _prepared(header, segment)
            tokens = sum(p.cost for p in items)
            self._add_load(tokens, len(items))
            try:
                rows, timings = await self.core.embed(items)
            finally:
                self._add_load(-tokens, -len(items))
            del items
            reply = [ident, ipc.OK, ipc.dump({"id": request_id, **timings}), rows.tobytes()]
        except asyncio.CancelledError:
            return  # the front end gave up: nobody reads an answer
        except Exception as exc:
            if not isinstance(exc, (EngineUnavailableError, EngineOverloadedError, ForwardError)):
                if not _is_input_error(exc):
                    logger.exception("unexpected error in the engine")
                    exc = ForwardError("the model engine failed on this request; the error was logged")
            reply = [ident, ipc.ERROR, ipc.dump({"id": request_id, "error": exc})]
        finally:
            ipc.release(segment, unlink=False)
        await self.sock.send_multipart(reply)


def main(
    config: EngineConfig, address: str, board_path: str, generation: int, log_level: str, role: str = "engine"
) -> None:
    """Entry point of the engine process (spawned by ``EngineSupervisor``)."""
    from service.proctitle import set_role

    set_role(role)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The parent's terminal Ctrl-C reaches every process of the group; the supervisor
    # decides when the engine stops (after the front ends drained), so ignore SIGINT here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = EngineServer(config, address, board_path, generation)
    code = asyncio.run(server.run())
    sys.exit(code)
