"""The one device thread and the preprocessing pool.

All model loading and every forward pass run on ``DeviceWorker``'s single thread, never
on the event loop: GPU work is serial anyway, CUDA state stays on one thread, and the
event loop keeps answering (health, metrics, 429s) while a batch runs. Preprocessing
(decoding, tiling, tokenising) runs in a plain thread pool so it overlaps the forward
pass of the previous batch.

A job that raises an ``Exception`` fails only its own future. A job that raises
``FatalDeviceError`` (an unrecoverable device state, e.g. a CUDA device-side assert,
after which every later kernel would fail) or any other ``BaseException`` stops the
thread: the current and all queued jobs fail with ``WorkerDeadError``, later calls fail at
once, and ``alive`` turns false so ``/health`` answers 503 and an orchestrator restarts us.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("llave.worker")


class FatalDeviceError(BaseException):
    """Raised inside a device job to stop the device thread (the device is unusable)."""


class WorkerDeadError(RuntimeError):
    """The device thread is not running."""


_STOP = object()


def _resolve(fut: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():  # the caller gave up (cancelled) meanwhile
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class DeviceWorker:
    """A single thread that runs device jobs in order; ``await run(fn, *args)`` from the loop."""

    def __init__(self, name: str = "llave-device") -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._lock = threading.Lock()  # no job is queued after the thread drained its queue
        self._closed = False  # stopping, stopped or dead: no new jobs
        self.death: str | None = None  # why the thread died, when it did

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.death is None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed or not self._thread.is_alive():
                raise WorkerDeadError(self.death or "the device thread is not running")
            self._jobs.put((fn, args, fut, loop))
        return await fut

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the job in hand, then exit (queued jobs fail with ``WorkerDeadError``)."""
        with self._lock:
            self._closed = True
            self._jobs.put(_STOP)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _main(self) -> None:
        job: Any = None
        try:
            while True:
                job = self._jobs.get()
                if job is _STOP:
                    job = None
                    return
                fn, args, fut, loop = job
                try:
                    result = fn(*args)
                except Exception as exc:
                    loop.call_soon_threadsafe(_resolve, fut, None, exc)
                else:
                    loop.call_soon_threadsafe(_resolve, fut, result)
                job = None
        except BaseException as exc:
            with self._lock:
                self.death = f"the device thread died: {type(exc).__name__}"
            logger.critical("%s; the server needs a restart", self.death, exc_info=exc)
        finally:
            with self._lock:
                self._closed = True
                self._fail_remaining(job)

    def _fail_remaining(self, current: Any) -> None:
        reason = self.death or "the server is shutting down"
        pending = [current] if current is not None else []
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                pending.append(item)
        for _fn, _args, fut, loop in pending:
            try:
                loop.call_soon_threadsafe(_resolve, fut, None, WorkerDeadError(reason))
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass


def preprocess_pool(workers: int) -> ThreadPoolExecutor:
    """Threads for CPU preprocessing (PIL and the tokenizer release the GIL for most work)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llave-preprocess")
