"""Dynamic batching in pure asyncio: no torch, no model, testable with fake costs.

Callers hand in work items ``(payload, cost)``; one loop groups them into batches and
calls ``run_batch(payloads) -> results`` (an async function, in the server the forward
pass on the device thread), then hands each result to the caller that asked for it.

Admission and overload. A request first ``admit(n)``s its n inputs, before it spends any
CPU on them: the queue limit counts inputs that are admitted and not yet on the device,
including those still being preprocessed. When the queue is full ``admit`` raises
``QueueFullError`` at once (the server answers 429); nothing queues forever. After
preprocessing, ``Admission.submit`` turns the reservation into queued items; if the
caller gives up first (an input error, a client that went away) ``Admission.release``
returns the places.

Batch forming (one batch on the device at a time, as there is one device thread):
- the batch is filled up to ``max_batch_size`` items and ``max_batch_tokens`` padded
  tokens, where padding is charged: a batch costs ``max(cost) * len(batch)``; an item
  costlier than the whole budget runs alone;
- the oldest queued item always goes in the next batch (no starvation); the others are
  chosen among the next ``sort_window`` items by cost, closest to it first, so that
  inputs of similar length share a batch and little compute goes to padding;
- while the device is busy work accumulates by itself, so batches form under load
  without any timer. When the device is idle and the queue holds less than a full batch,
  the batch leaves at once unless waiting is expected to pay (adaptive forming, below);
  the device then stays idle at most ``max_wait_s`` per batch;
- items whose future is already done (the caller timed out or went away and cancelled
  it) are dropped without running.

Adaptive forming. The batcher measures two things online:
- the device's cost curve: the run time of each batch against its size, per bucket of
  padded length (powers of two), kept as a running mean per power-of-two size class and
  fitted with ``t(n) = a + b * n`` (``CostModel``). A GPU's curve is nearly flat (a large
  ``a``: kernel launches, memory traffic of the weights), a CPU's nearly proportional;
- when answered inputs come back (``ReturnModel``): each completed batch is remembered as
  inputs "out" with their callers; a later arrival is matched to the oldest of them, and
  the delay from answer to next arrival is tracked (running mean and mean deviation, as
  TCP tracks a round trip). Under closed-loop load (clients that send again when
  answered) this predicts the next arrivals well; with independent callers it measures
  the recent arrival rate in the same terms; with no recent arrivals it predicts none.
When the device becomes idle with ``q`` inputs queued, the batcher compares sending now,
``q / t(q)`` inputs per second of device time, with waiting ``w`` for the ``m`` inputs
expected by then, ``(q + m) / (w + t(q + m))`` (the idle wait counted as spent), and
waits only when the best choice beats sending now by ``min_gain`` (relative). Every
arrival wakes it to decide again; a full batch leaves at once. With a flat curve and
callers that come back within a few milliseconds this fills batches; with a
proportional curve waiting never pays; a lone request (nothing expected) never waits.
Inputs admitted and not yet submitted (still being preprocessed by the caller) are
waited for, up to ``max_wait_s``, as before.

An exception from ``run_batch`` fails that batch's items only; the loop goes on. A result
that is itself an ``Exception`` fails its own item only (``run_batch`` isolates a failing
input that way).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")

logger = logging.getLogger("llave.batching")


class QueueFullError(Exception):
    """The queue cannot take this many more inputs now."""


class BatcherClosedError(Exception):
    """The batcher is stopped (server shutting down) or its loop died."""


@dataclass(frozen=True)
class BatchStats:
    """What one forward pass was: reported to ``on_batch`` and with every result."""

    batch_id: int
    size: int
    padded_tokens: int  # max(cost) * size
    real_tokens: int  # sum(cost)
    run_s: float
    waited_s: float = 0.0  # how long the batch was held back on an idle device to fill up


@dataclass(frozen=True)
class Completed(Generic[R]):
    """One item's result, with how long it queued and which batch carried it."""

    value: R
    queued_s: float
    batch: BatchStats


@dataclass(eq=False)
class WorkItem(Generic[P]):
    payload: P
    cost: int
    future: asyncio.Future[Any]
    enqueued_at: float
    seq: int = 0
    dispatched_at: float = field(default=0.0)


class CostModel:
    """The device's run time per batch against batch size, learnt from the batches run.

    Per bucket of padded length (the longest input, rounded up to a power of two), one
    running mean of (size, seconds) per power-of-two size class; ``predict`` fits
    ``t(n) = a + b * n`` through the classes' means (least squares, each class counting
    once, so that a burst of full batches does not erase what small ones cost).
    """

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self._classes: dict[int, dict[int, list[float]]] = {}  # bucket -> class -> [n, s]

    @staticmethod
    def bucket(max_cost: int) -> int:
        return max(0, int(max_cost) - 1).bit_length()

    def observe(self, size: int, max_cost: int, run_s: float) -> None:
        if size < 1 or not run_s >= 0:
            return
        classes = self._classes.setdefault(self.bucket(max_cost), {})
        mean = classes.get(size.bit_length())
        if mean is None:
            classes[size.bit_length()] = [float(size), float(run_s)]
        else:
            mean[0] += self.alpha * (size - mean[0])
            mean[1] += self.alpha * (run_s - mean[1])

    def fit(self, max_cost: int) -> tuple[float, float] | None:
        """``(a, b)`` of ``t(n) = a + b * n`` for this length, or None while unknown.

        Known once batches of sizes at least a factor of two apart have run."""
        points = list(self._classes.get(self.bucket(max_cost), {}).values())
        if len(points) < 2:
            return None
        ns = [p[0] for p in points]
        if max(ns) < 2 * min(ns):
            return None
        n_mean = sum(ns) / len(ns)
        t_mean = sum(p[1] for p in points) / len(points)
        var = sum((n - n_mean) ** 2 for n in ns)
        b = sum((p[0] - n_mean) * (p[1] - t_mean) for p in points) / var
        b = max(b, 0.0)  # noise can tilt a flat curve below zero: a batch never costs less
        return t_mean - b * n_mean, b

    def predict(self, size: int, max_cost: int) -> float | None:
        fitted = self.fit(max_cost)
        if fitted is None:
            return None
        a, b = fitted
        return max(a + b * size, 1e-9)


class ReturnModel:
    """When answered inputs come back, learnt from arrivals (see the module docstring).

    Completed batches are "out": ``[answered_at, count]``, oldest first. Arrivals are
    matched to the oldest inputs out; when the last input of a batch is back, the delay
    from its answer (the time for the whole batch to come back) updates a running mean
    and mean deviation (gains 1/8 and 1/4, as TCP's round-trip estimate). The inputs of a
    batch are expected back by ``answered_at + mean + 3 * deviation``; after that they are
    late and no longer expected (their callers went away or paused), and after twice
    that they are forgotten (see ``_forget``).
    """

    def __init__(self, horizon_s: float = 1.0) -> None:
        self.horizon_s = horizon_s
        self._out: deque[list[float]] = deque()  # [answered_at, count still out]
        self.mean_s: float | None = None
        self.dev_s = 0.0

    def completed(self, now: float, count: int) -> None:
        if count > 0:
            self._out.append([now, float(count)])

    def arrived(self, now: float, count: int) -> None:
        self._forget(now)
        left = float(count)
        while left > 0 and self._out:
            entry = self._out[0]
            take = min(left, entry[1])
            entry[1] -= take
            left -= take
            if entry[1] <= 0:  # the whole batch is back
                self._out.popleft()
                self._learn(now - entry[0])

    def _learn(self, delay: float) -> None:
        if self.mean_s is None:
            self.mean_s, self.dev_s = delay, delay / 2
        else:
            self.dev_s += 0.25 * (abs(delay - self.mean_s) - self.dev_s)
            self.mean_s += 0.125 * (delay - self.mean_s)

    def _forget(self, now: float) -> None:
        """Drop batches not all back after twice the expected delay (or ``horizon_s``).

        Their callers went away or paused; later arrivals are matched to newer batches.
        The drop counts as a return at twice the expected delay, so that an estimate
        that is too short grows."""
        expected = self.return_s
        while self._out:
            out_for = now - self._out[0][0]
            if out_for > self.horizon_s:
                self._out.popleft()
            elif expected is not None and out_for > 2 * expected:
                self._out.popleft()
                self._learn(2 * expected)
            else:
                break

    @property
    def return_s(self) -> float | None:
        """The delay by which a batch's inputs are expected back (None: not measured yet)."""
        return None if self.mean_s is None else self.mean_s + 3 * self.dev_s

    def expected(self, now: float, until: float) -> list[tuple[float, int]]:
        """``(when, count)`` of the inputs expected back after ``now`` and by ``until``."""
        self._forget(now)
        delay = self.return_s
        if delay is None:
            return []
        out = []
        for answered_at, count in self._out:
            when = answered_at + delay
            if now < when <= until and count >= 1:
                out.append((when, int(count)))
        return out


class Admission:
    """Places reserved in the queue for one request's inputs (see ``DynamicBatcher.admit``)."""

    def __init__(self, batcher: DynamicBatcher[Any, Any], n: int) -> None:
        self._batcher = batcher
        self.remaining = n

    def submit(self, items: Sequence[tuple[Any, int]]) -> list[asyncio.Future[Any]]:
        """Queue ``(payload, cost)`` items using reserved places; return one future each.

        Each future resolves to a ``Completed`` (or raises what ``run_batch`` raised).
        """
        if len(items) > self.remaining:
            raise ValueError(f"submitting {len(items)} items on {self.remaining} reserved places")
        self.remaining -= len(items)
        return self._batcher._enqueue(items)

    def release(self) -> None:
        """Give back the places not submitted (idempotent)."""
        if self.remaining:
            self._batcher._release(self.remaining)
            self.remaining = 0

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class DynamicBatcher(Generic[P, R]):
    """Groups queued items into batches for ``run_batch``; see the module docstring."""

    def __init__(
        self,
        run_batch: Callable[[list[P]], Awaitable[Sequence[R]]],
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float = 0.005,
        max_queue: int = 1024,
        sort_window: int = 128,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_queue_change: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        adaptive: bool = True,
        min_gain: float = 0.02,
    ) -> None:
        if max_batch_size < 1 or max_batch_tokens < 1 or max_queue < 1 or sort_window < 1:
            raise ValueError("batch size, token budget, queue size and sort window must be >= 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.sort_window = max(sort_window, max_batch_size)
        self._on_batch = on_batch
        self._on_queue_change = on_queue_change
        self._clock = clock
        self.adaptive = adaptive  # False: never wait for expected arrivals (only reserved inputs)
        self.min_gain = min_gain
        self.costs = CostModel()
        self.returns = ReturnModel()
        self._idle_since = float("-inf")  # when the last batch finished

        self._queue: deque[WorkItem[P]] = deque()
        self._reserved = 0  # admitted, not yet submitted (being preprocessed)
        self._seq = 0
        self._batch_seq = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.busy = False  # a batch is on the device

    # --- state -------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Inputs counted against ``max_queue``: reserved plus queued."""
        return self._reserved + len(self._queue)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _changed(self) -> None:
        if self._on_queue_change is not None:
            self._on_queue_change(self.pending)

    # --- producer side -----------------------------------------------------------------

    def admit(self, n: int) -> Admission:
        """Reserve ``n`` places or raise ``QueueFullError`` (never waits)."""
        if self._closed or (self._task is not None and self._task.done()):
            raise BatcherClosedError("the batcher is not running")
        if n < 0:
            raise ValueError("n must be >= 0")
        if self.pending + n > self.max_queue:
            raise QueueFullError(
                f"queue full: {self.pending} of {self.max_queue} inputs pending, {n} more asked"
            )
        self._reserved += n
        self._changed()
        return Admission(self, n)

    async def submit(self, items: Sequence[tuple[P, int]]) -> list[Completed[R]]:
        """Admit, queue and wait for ``items`` in one call (no separate preprocessing)."""
        with self.admit(len(items)) as admission:
            futures = admission.submit(items)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise

    def _enqueue(self, items: Sequence[tuple[P, int]]) -> list[asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        now = self._clock()
        futures = []
        for payload, cost in items:
            if cost < 1:
                raise ValueError(f"cost must be >= 1, got {cost}")
            fut: asyncio.Future[Any] = loop.create_future()
            self._seq += 1
            self._queue.append(WorkItem(payload, int(cost), fut, now, self._seq))
            futures.append(fut)
        self.returns.arrived(now, len(items))
        self._reserved -= len(items)
        if self._closed:
            self._fail_queued(BatcherClosedError("the batcher is shutting down"))
        self._changed()
        self._wakeup.set()
        return futures

    def _release(self, n: int) -> None:
        self._reserved -= n
        self._changed()
        self._wakeup.set()  # a waiting batch may stop waiting for these

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="llave-batcher")

    async def stop(self) -> None:
        """Stop forming batches; queued items fail with ``BatcherClosedError``."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail_queued(BatcherClosedError("the batcher is shutting down"))

    def _fail_queued(self, exc: BaseException) -> None:
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(exc)
        self._changed()

    # --- consumer side -----------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        if any(item.future.done() for item in self._queue):
            self._queue = deque(item for item in self._queue if not item.future.done())
            self._changed()

    def _should_wait(self, first_enqueued: float) -> float:
        """Seconds to wait for inputs still being preprocessed before dispatching (0: go)."""
        if self.max_wait_s <= 0 or self._reserved == 0 or len(self._queue) >= self.max_batch_size:
            return 0.0
        head = self._queue[0]
        if head.cost * min(len(self._queue) + 1, self.max_batch_size) > self.max_batch_tokens:
            return 0.0  # the budget is spent already: more items could not join
        return max(0.0, first_enqueued + self.max_wait_s - self._clock())

    def batch_room(self) -> int:
        """How many inputs the next batch could hold, judged by the oldest one's cost."""
        if not self._queue:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, self.max_batch_tokens // self._queue[0].cost))

    def adaptive_wait(self, deadline: float) -> float:
        """Seconds to wait for inputs expected back before dispatching (0: go now).

        Compares inputs per second of device time now and after waiting for the inputs
        expected by then (see the module docstring); never past ``deadline``."""
        now = self._clock()
        q = len(self._queue)
        if not self.adaptive or q == 0 or now >= deadline:
            return 0.0
        room = self.batch_room()
        if q >= room:
            return 0.0
        max_cost = self._queue[0].cost
        t_now = self.costs.predict(q, max_cost)
        if t_now is None:
            return 0.0  # the cost curve is not known yet
        best_rate, best_wait = q / t_now, 0.0
        floor = best_rate * (1.0 + self.min_gain)
        more = 0
        for when, count in self.returns.expected(now, deadline):
            more = min(more + count, room - q)
            wait = when - now
            t_then = self.costs.predict(q + more, max_cost)
            assert t_then is not None
            rate = (q + more) / (wait + t_then)
            if rate > best_rate and rate >= floor:
                best_rate, best_wait = rate, wait
            if q + more >= room:
                break
        return best_wait

    def take_batch(self) -> list[WorkItem[P]]:
        """Remove and return the next batch (oldest item plus cost neighbours)."""
        self._drop_cancelled()
        if not self._queue:
            return []
        window = [self._queue[i] for i in range(min(self.sort_window, len(self._queue)))]
        by_cost = sorted(window, key=lambda it: (it.cost, it.seq))
        anchor = by_cost.index(window[0])
        lo = hi = anchor  # the batch is by_cost[lo:hi + 1]
        max_cost = by_cost[anchor].cost
        n = 1
        while n < self.max_batch_size:
            left = by_cost[lo - 1] if lo > 0 else None
            right = by_cost[hi + 1] if hi + 1 < len(by_cost) else None
            # Padding each candidate would add: a cheaper item pads up to the current max;
            # a costlier one raises the max for everyone already in.
            left_waste = max_cost - left.cost if left is not None else None
            right_waste = (right.cost - max_cost) * n if right is not None else None
            fits_left = left is not None and max_cost * (n + 1) <= self.max_batch_tokens
            fits_right = right is not None and right.cost * (n + 1) <= self.max_batch_tokens
            if fits_left and (not fits_right or left_waste <= right_waste):  # type: ignore[operator]
                lo -= 1
            elif fits_right:
                hi += 1
                max_cost = right.cost  # type: ignore[union-attr]
            else:
                break
            n += 1
        chosen = by_cost[lo : hi + 1]
        ids = {id(item) for item in chosen}
        self._queue = deque(item for item in self._queue if id(item) not in ids)
        chosen.sort(key=lambda it: it.seq)
        return chosen

    def _delay(self, first_enqueued: float, deadline: float) -> float:
        return max(self._should_wait(first_enqueued), self.adaptive_wait(deadline))

    async def _loop(self) -> None:
        while True:
            self._drop_cancelled()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._queue[0].enqueued_at
            # The device idles at most max_wait_s per batch, counted from when it went idle
            # (or from the oldest input's arrival, when that came later).
            held_from = self._clock()
            deadline = max(self._idle_since, first) + self.max_wait_s
            delay = self._delay(first, deadline)
            waited = delay > 0
            while delay > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=delay)
                except TimeoutError:
                    pass  # decide again: the inputs expected by now are late
                self._drop_cancelled()
                if not self._queue:
                    break
                delay = self._delay(first, deadline)
            batch = self.take_batch()
            if batch:
                self._changed()
                await self._dispatch(batch, self._clock() - held_from if waited else 0.0)

    async def _dispatch(self, batch: list[WorkItem[P]], waited_s: float = 0.0) -> None:
        self._batch_seq += 1
        start = self._clock()
        for item in batch:
            item.dispatched_at = start
        error: Exception | None = None
        self.busy = True
        try:
            results = await self._run_batch([item.payload for item in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherClosedError("the batcher is shutting down"))
            raise
        except Exception as exc:  # fails this batch only
            error = exc
        finally:
            self.busy = False
        end = self._clock()
        stats = BatchStats(
            batch_id=self._batch_seq,
            size=len(batch),
            padded_tokens=max(item.cost for item in batch) * len(batch),
            real_tokens=sum(item.cost for item in batch),
            run_s=end - start,
            waited_s=waited_s,
        )
        self._idle_since = end
        if error is None and not any(isinstance(value, Exception) for value in results):
            self.costs.observe(stats.size, max(item.cost for item in batch), stats.run_s)
        self.returns.completed(end, len(batch))
        if self._on_batch is not None:
            try:
                self._on_batch(stats)
            except Exception:  # metrics must never fail the batch
                logger.exception("on_batch callback failed")
        if error is not None:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        for item, value in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(value, Exception):  # this item failed on its own
                item.future.set_exception(value)
            else:
                item.future.set_result(Completed(value, item.dispatched_at - item.enqueued_at, stats))
