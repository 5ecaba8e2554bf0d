"""The channels between front ends and the engine, across real processes."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from service.inference import ipc


def _read_pixels(name: str, slots, out) -> None:  # type: ignore[no-untyped-def]
    segment = ipc.open_pixels(name)
    for i, slot in enumerate(slots):
        if slot is not None:
            view = ipc.view_pixels(segment, slot)
            out.put((i, view.shape, float(view.sum(dtype=np.float64)), float(view.flat[-1])))
            del view
    ipc.release(segment, unlink=False)


def _write_board(path: str) -> None:
    board = ipc.StatusBoard(path)
    board.write(ipc.READY, generation=7, pid=4321)


def test_pixels_written_by_one_process_are_read_by_another():
    rng = np.random.default_rng(0)
    arrays = [rng.random((2, 3, 8, 8), dtype=np.float32), None, rng.random((5, 3, 8, 8), dtype=np.float32)]
    segment, slots = ipc.put_pixels(arrays, f"llave-test-{mp.current_process().pid}")
    assert segment.name.lstrip("/").startswith(f"llave-test-{mp.current_process().pid}-")
    assert slots[1] is None
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_read_pixels, args=(segment.name, slots, out))
    proc.start()
    proc.join(60)
    got = sorted(out.get(timeout=5) for _ in range(2))
    ipc.release(segment, unlink=True)
    assert [index for index, *_ in got] == [0, 2]
    for (_index, shape, total, last), expected in zip(got, [arrays[0], arrays[2]], strict=True):
        assert shape == expected.shape
        assert total == pytest.approx(float(expected.sum(dtype=np.float64)), rel=1e-9)
        assert last == float(expected.flat[-1])


def test_a_request_without_images_uses_no_shared_memory():
    segment, slots = ipc.put_pixels([None, None], "llave-test-none")
    assert segment is None and slots == [None, None]


def test_the_status_board_is_shared_between_processes(tmp_path):
    path = tmp_path / "engine.status"
    board = ipc.StatusBoard(path, create=True)
    assert board.read() == (ipc.STARTING, 0, 0, 0)
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_write_board, args=(str(path),))
    proc.start()
    proc.join(60)
    assert board.read()[:3] == (ipc.READY, 7, 4321)
    assert board.count_restart() == 1
    assert ipc.StatusBoard(path).read()[3] == 1


def test_a_full_dev_shm_refuses_the_request_and_leaves_no_segment(monkeypatch):
    # A real full tmpfs cannot be made here without root mounts; the reservation call is
    # made to fail as it does then (ENOSPC), everything else is real.
    import errno
    import os
    from multiprocessing import shared_memory

    from service.inference.errors import EngineOverloadedError

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    names: list[str] = []
    monkeypatch.setattr(ipc, "segment_name", lambda prefix: names.append(f"{prefix}-full") or names[-1])
    with pytest.raises(EngineOverloadedError, match="shared memory"):
        ipc.put_pixels([np.ones((1, 3, 4, 4), np.float32)], f"llave-test-{os.getpid()}")
    assert len(names) == 1
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=names[0])


def test_segment_names_are_random():
    prefix = f"llave-test-{mp.current_process().pid}"
    names = {ipc.segment_name(prefix) for _ in range(1000)}
    assert len(names) == 1000
    # 64 random bits after the prefix: the next name cannot be told from the previous ones.
    assert all(len(n.removeprefix(prefix + "-")) == 16 for n in names)


def test_a_taken_segment_name_is_replaced_by_a_fresh_one(monkeypatch):
    # A local user creates the name a request would use first (a real segment, as an
    # attacker would): the request takes another name and its pixels are intact, while the
    # squatter's segment is left as it was.
    from multiprocessing import shared_memory

    prefix = f"llave-test-squat-{mp.current_process().pid}"
    squatted = ipc.segment_name(prefix)
    squatter = shared_memory.SharedMemory(name=squatted, create=True, size=64)
    squatter.buf[:4] = b"mine"
    tried: list[str] = []
    real = ipc.segment_name

    def predictable_then_random(p: str) -> str:
        tried.append(squatted if not tried else real(p))
        return tried[-1]

    monkeypatch.setattr(ipc, "segment_name", predictable_then_random)
    try:
        pixels = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
        segment, slots = ipc.put_pixels([pixels], prefix)
        try:
            assert len(tried) == 2 and segment.name.lstrip("/") == tried[1].lstrip("/") != squatted
            np.testing.assert_array_equal(ipc.view_pixels(segment, slots[0]), pixels)
        finally:
            ipc.release(segment, unlink=True)
        assert bytes(squatter.buf[:4]) == b"mine"
    finally:
        squatter.close()
        squatter.unlink()


def test_a_name_taken_every_time_is_a_429_not_a_500(monkeypatch):
    from multiprocessing import shared_memory

    from service.inference.errors import EngineOverloadedError

    prefix = f"llave-test-always-{mp.current_process().pid}"
    squatter = shared_memory.SharedMemory(name=f"{prefix}-x", create=True, size=64)
    monkeypatch.setattr(ipc, "segment_name", lambda p: f"{p}-x")
    try:
        with pytest.raises(EngineOverloadedError, match="shared-memory name"):
            ipc.put_pixels([np.ones((1, 3, 4, 4), np.float32)], prefix)
    finally:
        squatter.close()
        squatter.unlink()
