"""The dynamic batcher on its own: fake costs, fake forward passes, no model, no torch."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.inference.batching import BatcherClosedError, BatchStats, DynamicBatcher, QueueFullError


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
