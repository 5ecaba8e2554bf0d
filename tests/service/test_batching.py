"""The dynamic batcher on its own: fake costs, fake forward passes, no model, no torch."""

from __future__ import annotations

import asyncio
import random
import selectors
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.inference.batching import (
    BatcherClosedError,
    BatchStats,
    CostModel,
    DynamicBatcher,
    QueueFullError,
    ReturnModel,
)


def run(coro):
    return asyncio.run(coro)


class GatedDevice:
    """A fake forward pass: records each batch, can be held busy until released."""

    def __init__(self, fail_when=None):
        self.batches: list[list] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.fail_when = fail_when

    async def __call__(self, payloads):
        self.batches.append(list(payloads))
        self.started.set()
        await self.gate.wait()
        if self.fail_when is not None and any(self.fail_when(p) for p in payloads):
            raise RuntimeError("boom")
        return [("result", p) for p in payloads]


async def settle(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_results_go_back_to_their_callers():
    async def main():
        device = GatedDevice()
        batcher = DynamicBatcher(device, max_batch_size=4, max_batch_tokens=1000, max_wait_s=0)
        batcher.start()
        requests = [[(f"r{r}i{i}", 1 + (r + i) % 7) for i in range(r % 3 + 1)] for r in range(20)]
        answers = await asyncio.gather(*(batcher.submit(items) for items in requests))
        for items, answer in zip(requests, answers, strict=True):
            assert [c.value for c in answer] == [("result", p) for p, _ in items]
        assert sorted(p for b in device.batches for p in b) == sorted(p for r in requests for p, _ in r)
        await batcher.stop()

    run(main())


def test_idle_device_dispatches_alone_and_busy_device_accumulates():
    async def main():
        device = GatedDevice()
        # A long max_wait: it must not delay a lone request when nothing else is coming.
        batcher = DynamicBatcher(device, max_batch_size=8, max_batch_tokens=10_000, max_wait_s=60)
        batcher.start()
        device.gate.clear()
        first = asyncio.create_task(batcher.submit([("a", 5)]))
        await device.started.wait()
        assert device.batches == [["a"]]
        later = [asyncio.create_task(batcher.submit([(f"b{i}", 5)])) for i in range(10)]
        await settle()
        assert batcher.queued == 10 and batcher.busy
        device.gate.set()
        await asyncio.gather(first, *later)
        assert [len(b) for b in device.batches] == [1, 8, 2]
        await batcher.stop()

    run(main())


def test_waits_for_inputs_still_being_preprocessed():
    async def main():
        device = GatedDevice()
        batcher = DynamicBatcher(device, max_batch_size=8, max_batch_tokens=10_000, max_wait_s=60)
        batcher.start()
        slow = batcher.admit(3)  # three inputs admitted, still "preprocessing"
        fast = batcher.admit(1)
        fut_fast = fast.submit([("fast", 4)])
        await settle()
        assert device.batches == []  # held back for the reserved inputs
        futs_slow = slow.submit([("s1", 4), ("s2", 4)])
        await settle()
        assert device.batches == []  # one reserved place still outstanding
        slow.release()  # e.g. the third input failed to decode
        await asyncio.gather(*fut_fast, *futs_slow)
        assert device.batches == [["fast", "s1", "s2"]]
        await batcher.stop()

    run(main())


def test_wait_for_preprocessing_is_bounded():
    async def main():
        device = GatedDevice()
        batcher = DynamicBatcher(device, max_batch_size=8, max_batch_tokens=10_000, max_wait_s=0.02)
        batcher.start()
        stuck = batcher.admit(5)  # never submitted while we wait
        futs = batcher.admit(1).submit([("x", 3)])
        done = await asyncio.gather(*futs)
        assert done[0].value == ("result", "x")
        stuck.release()
        await batcher.stop()

    run(main())


def test_full_batch_leaves_without_waiting():
    async def main():
        device = GatedDevice()
        batcher = DynamicBatcher(device, max_batch_size=2, max_batch_tokens=10_000, max_wait_s=60)
        batcher.start()
        outstanding = batcher.admit(10)
        futs = outstanding.submit([("a", 1), ("b", 1)])
        await asyncio.gather(*futs)
        assert device.batches == [["a", "b"]]
        outstanding.release()
        await batcher.stop()

    run(main())


def test_padding_is_charged_against_the_token_budget():
    async def main():
        device = GatedDevice()
        batcher = DynamicBatcher(device, max_batch_size=10, max_batch_tokens=100, max_wait_s=0)
        costs = [10, 60, 10, 10, 30]
        futs = batcher.admit(len(costs)).submit([(f"c{c}-{i}", c) for i, c in enumerate(costs)])
        batcher.start()
        await asyncio.gather(*futs)
        for batch in device.batches:
            batch_costs = [int(p.split("-")[0][1:]) for p in batch]
            assert max(batch_costs) * len(batch) <= 100
        # 60 cannot share with anything (60 * 2 > 100): it ran alone.
        assert ["c60-1"] in device.batches
        await batcher.stop()

    run(main())


def test_item_over_the_budget_runs_alone():
    async def main():
        device = GatedDevice()
        batcher = DynamicBatcher(device, max_batch_size=4, max_batch_tokens=50, max_wait_s=0)
        futs = batcher.admit(3).submit([("huge", 500), ("s1", 5), ("s2", 5)])
        batcher.start()
        await asyncio.gather(*futs)
        assert device.batches == [["huge"], ["s1", "s2"]]
        await batcher.stop()

    run(main())


def test_similar_costs_share_a_batch_and_oldest_goes_first():
    async def main():
        device = GatedDevice()
        batcher = DynamicBatcher(
            device, max_batch_size=3, max_batch_tokens=10_000, max_wait_s=0, sort_window=100
        )
        items = [(f"{'short' if i % 2 == 0 else 'long'}{i}", 5 if i % 2 == 0 else 500) for i in range(12)]
        futs = batcher.admit(len(items)).submit(items)
        batcher.start()
        await asyncio.gather(*futs)
        # The oldest item (short0) anchors the first batch; shorts and longs never mix.
        assert device.batches[0] == ["short0", "short2", "short4"]
        for batch in device.batches:
            assert len({p.rstrip("0123456789") for p in batch}) == 1
        await batcher.stop()

    run(main())


def test_queue_limit_counts_inputs_not_requests():
    async def main():
        batcher = DynamicBatcher(GatedDevice(), max_batch_size=4, max_batch_tokens=100, max_queue=5)
        batcher.start()
        first = batcher.admit(3)
        with pytest.raises(QueueFullError):
            batcher.admit(3)  # one request, but 3 + 3 inputs > 5
        second = batcher.admit(2)
        assert batcher.pending == 5
        with pytest.raises(QueueFullError):
            batcher.admit(1)
        first.release()
        assert batcher.pending == 2
        batcher.admit(3).release()
        second.release()
        assert batcher.pending == 0
        await batcher.stop()

    run(main())


def test_queue_gauge_follows_admissions_and_dispatch():
    async def main():
        seen: list[int] = []
        device = GatedDevice()
        batcher = DynamicBatcher(
            device, max_batch_size=4, max_batch_tokens=100, max_wait_s=0, on_queue_change=seen.append
        )
        batcher.start()
        await batcher.submit([("a", 1), ("b", 1), ("c", 1)])
        assert seen[0] == 3 and seen[-1] == 0
        await batcher.stop()

    run(main())


def test_cancelled_items_are_dropped_before_running():
    async def main():
        device = GatedDevice()
        batcher = DynamicBatcher(device, max_batch_size=4, max_batch_tokens=100, max_wait_s=0)
        batcher.start()
        device.gate.clear()
        blocker = asyncio.create_task(batcher.submit([("blocker", 1)]))
        await device.started.wait()
        gone = asyncio.create_task(batcher.submit([("gone1", 1), ("gone2", 1)]))
        kept = asyncio.create_task(batcher.submit([("kept", 1)]))
        await settle()
        assert batcher.pending == 3
        gone.cancel()  # the client went away (or timed out) while queued
        await settle()
        device.gate.set()
        await asyncio.gather(blocker, kept)
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert device.batches == [["blocker"], ["kept"]]
        assert batcher.pending == 0
        await batcher.stop()

    run(main())


def test_a_failing_batch_fails_only_its_own_items():
    async def main():
        device = GatedDevice(fail_when=lambda p: p == "poison")
        stats: list[BatchStats] = []
        batcher = DynamicBatcher(
            device, max_batch_size=2, max_batch_tokens=100, max_wait_s=0, on_batch=stats.append
        )
        batcher.start()
        device.gate.clear()
        blocker = asyncio.create_task(batcher.submit([("blocker", 1)]))
        await device.started.wait()
        bad = asyncio.create_task(batcher.submit([("poison", 1)]))
        neighbour = asyncio.create_task(batcher.submit([("neighbour", 1)]))
        await settle()
        after = asyncio.create_task(batcher.submit([("after", 1)]))
        await settle()
        device.gate.set()
        results = await asyncio.gather(blocker, bad, neighbour, after, return_exceptions=True)
        assert device.batches == [["blocker"], ["poison", "neighbour"], ["after"]]
        assert isinstance(results[1], RuntimeError) and isinstance(results[2], RuntimeError)
        assert results[3][0].value == ("result", "after")
        assert batcher.running
        assert [s.size for s in stats] == [1, 2, 1]  # failed forward passes are still counted
        await batcher.stop()

    run(main())


def test_results_carry_queue_time_and_batch_stats():
    async def main():
        batcher = DynamicBatcher(GatedDevice(), max_batch_size=4, max_batch_tokens=100, max_wait_s=0)
        batcher.start()
        out = await batcher.submit([("a", 3), ("b", 7)])
        assert out[0].batch is out[1].batch
        assert out[0].batch.size == 2
        assert out[0].batch.padded_tokens == 14 and out[0].batch.real_tokens == 10
        assert out[0].queued_s >= 0 and out[0].batch.run_s >= 0
        await batcher.stop()

    run(main())


def test_stop_fails_queued_work_and_refuses_new_work():
    async def main():
        device = GatedDevice()
        batcher = DynamicBatcher(device, max_batch_size=1, max_batch_tokens=100, max_wait_s=0)
        batcher.start()
        device.gate.clear()
        running = asyncio.create_task(batcher.submit([("a", 1)]))
        await device.started.wait()
        queued = asyncio.create_task(batcher.submit([("b", 1)]))
        await settle()
        await batcher.stop()
        for task in (running, queued):
            with pytest.raises(BatcherClosedError):
                await task
        with pytest.raises(BatcherClosedError):
            batcher.admit(1)

    run(main())


def test_batcher_does_not_import_torch():
    code = "import sys, service.inference.batching; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=60),
    max_batch_size=st.integers(min_value=1, max_value=16),
    max_batch_tokens=st.integers(min_value=1, max_value=2000),
    sort_window=st.integers(min_value=1, max_value=64),
)
def test_batches_respect_limits_and_cover_every_item_once(
    costs, max_batch_size, max_batch_tokens, sort_window
):
    async def main():
        async def never(payloads):
            raise AssertionError("not started")

        batcher = DynamicBatcher(
            never,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            max_queue=len(costs),
            sort_window=sort_window,
        )
        batcher.admit(len(costs)).submit([(i, c) for i, c in enumerate(costs)])
        seen: list[int] = []
        while batcher.queued:
            oldest = min(item.payload for item in batcher._queue)
            batch = batcher.take_batch()
            ids = [item.payload for item in batch]
            assert oldest in ids  # no starvation
            assert 1 <= len(batch) <= max_batch_size
            if len(batch) > 1:
                assert max(costs[i] for i in ids) * len(batch) <= max_batch_tokens
            seen.extend(ids)
        assert sorted(seen) == list(range(len(costs)))

    run(main())


# --- adaptive batch forming on a virtual clock --------------------------------------------


class _WarpSelector(selectors.SelectSelector):
    """A selector that, instead of sleeping until the next timer, moves virtual time there."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout=None):
        ready = super().select(0 if timeout is not None else None)
        if not ready and timeout is not None and timeout > 0:
            self.now += timeout
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is virtual: sleeps take no wall time, order is exact."""

    def __init__(self) -> None:
        self._warp = _WarpSelector()
        super().__init__(self._warp)

    def time(self) -> float:
        return self._warp.now


def gpu_cost(n: int) -> float:
    """Nearly flat in batch size, as a GPU's (the H100 figures: 16 ms at 1, 27 ms at 64)."""
    return 0.016 + 0.011 * (n - 1) / 63


def cpu_cost(n: int) -> float:
    """Proportional to batch size, as a CPU's."""
    return 0.0002 + 0.004 * n


def closed_loop(cost, *, clients=64, duration=2.0, adaptive=True, lone_after=None, return_s=(0.0005, 0.003)):
    """``clients`` callers that each send one input, wait for it, pause ``return_s``, repeat.

    Runs on a virtual clock (the batcher's clock is the loop's): the device "runs" a batch
    by sleeping ``cost(n)``. With ``lone_after``, all callers but one stop at that time.
    Returns every batch's stats.
    """
    stats: list[BatchStats] = []

    async def main():
        loop = asyncio.get_running_loop()
        rng = random.Random(0)

        async def device(payloads):
            await asyncio.sleep(cost(len(payloads)))
            return payloads

        batcher = DynamicBatcher(
            device,
            max_batch_size=64,
            max_batch_tokens=1_000_000,
            max_wait_s=0.02,
            max_queue=10_000,
            clock=loop.time,
            on_batch=stats.append,
            adaptive=adaptive,
        )
        batcher.start()

        async def client(i):
            await asyncio.sleep(rng.uniform(0, 0.03))  # staggered starts
            while loop.time() < duration:
                if lone_after is not None and i > 0 and loop.time() >= lone_after:
                    return
                out = await batcher.submit([(i, 40)])
                assert out[0].value == i
                await asyncio.sleep(rng.uniform(*return_s))

        await asyncio.gather(*(client(i) for i in range(clients)))
        await batcher.stop()

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(main())
    return stats


def test_flat_cost_closed_loop_fills_batches():
    adaptive = closed_loop(gpu_cost)
    plain = closed_loop(gpu_cost, adaptive=False)
    sizes = [s.size for s in adaptive[len(adaptive) // 4 :]]
    plain_sizes = [s.size for s in plain[len(plain) // 4 :]]
    # Without adaptive forming the clients split into alternating partial batches ...
    assert sum(plain_sizes) / len(plain_sizes) < 0.75 * 64
    # ... with it they join: near-full batches, and more inputs per virtual second.
    assert sum(sizes) / len(sizes) >= 0.9 * 64
    assert sum(s.size for s in adaptive) > 1.2 * sum(s.size for s in plain)
    assert any(s.waited_s > 0 for s in adaptive)
    assert all(s.waited_s <= 0.02 + 1e-9 for s in adaptive)  # never past max_wait_s


def test_linear_cost_never_waits():
    stats = closed_loop(cpu_cost)
    assert len({s.size for s in stats}) > 1  # the cost curve was measured at several sizes
    assert all(s.waited_s == 0 for s in stats)


def test_lone_request_is_not_delayed():
    # One client alone, with a flat cost curve known from the start of the run.
    stats = closed_loop(gpu_cost, clients=1, duration=0.5)
    assert len(stats) > 10 and all(s.size == 1 and s.waited_s == 0 for s in stats)
    # After a crowd that filled batches leaves, the one client left is not held back
    # (once the crowd's last answers are past their expected return).
    stats = closed_loop(gpu_cost, duration=1.0, lone_after=0.5)
    crowd = [s for s in stats if s.size > 32]
    assert crowd and any(s.waited_s > 0 for s in crowd)
    lone = stats[stats.index(crowd[-1]) + 3 :]
    assert len(lone) > 10 and all(s.size == 1 and s.waited_s == 0 for s in lone)


def test_cost_model_fits_the_curve_per_length_bucket():
    model = CostModel()
    assert model.fit(40) is None
    for n in (1, 2, 8, 64):
        model.observe(n, 40, 0.010 + 0.001 * n)
    a, b = model.fit(40)
    assert a == pytest.approx(0.010) and b == pytest.approx(0.001)
    assert model.predict(32, 33) == pytest.approx(0.042)  # 33..64 tokens share a bucket
    assert model.fit(100) is None  # another length bucket: not measured yet
    model.observe(3, 100, 0.01)
    model.observe(2, 100, 0.01)  # sizes 2 and 3 alone: too close to tell a slope
    assert model.fit(100) is None


def test_return_model_expects_answered_inputs_back():
    returns = ReturnModel(horizon_s=1.0)
    assert returns.expected(0.0, 10.0) == []
    returns.completed(0.0, 4)
    returns.arrived(0.002, 4)  # all four came back 2 ms after their answer
    assert returns.return_s == pytest.approx(0.002 + 3 * 0.001)
    returns.completed(1.0, 3)
    assert returns.expected(1.0, 1.1) == [(pytest.approx(1.005), 3)]
    assert returns.expected(1.0, 1.004) == []  # not by then
    assert returns.expected(1.006, 1.1) == []  # late: no longer expected
    returns.completed(2.0, 2)
    assert returns.expected(3.5, 4.0) == []  # forgotten after the horizon


def test_return_model_drops_batches_whose_callers_went_away():
    returns = ReturnModel(horizon_s=10.0)
    returns.completed(0.0, 2)
    returns.arrived(0.004, 2)  # whole batch back after 4 ms: expected back by 4 + 3 * 2 = 10 ms
    returns.completed(1.0, 5)  # these five callers never come back
    returns.completed(1.1, 1)
    # Past twice the expected delay the first batch is dropped (its drop lengthens the
    # estimate a little), so the next arrival is matched to the newer batch, not to it.
    returns.arrived(1.104, 1)
    assert returns.expected(1.104, 2.0) == []
    assert returns.mean_s is not None and returns.mean_s > 0.004
