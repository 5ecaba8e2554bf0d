"""How front ends and the engine process talk.

Three channels, each chosen for what it carries (measurements: bench/README.md,
``bench/ipc.py``):

- **Messages** over a ZeroMQ socket on a Unix-domain endpoint (``ipc://``): front ends
  hold a DEALER socket, the engine a ROUTER, so any number of front ends share one engine
  and each reply finds its sender. A request carries token ids and image sizes (pickled,
  small); a reply carries the pooled vectors as one raw float32 frame (a few KB per
  input: one copy through the socket costs less than setting up shared memory).
- **Pixels** in POSIX shared memory: a request with images puts all its crops in one
  segment (``/dev/shm/llave-<run>-<pid>-<random>``) and sends the segment's name and each input's
  offset and shape; the engine maps the same pages (no pickled copy of megabytes of
  pixels) and the front end unlinks the segment when the reply arrives.
- **Engine state** on a status board: a small memory-mapped file in the run directory
  that the engine writes (loading, warming, ready; its queued tokens) and its supervisor
  writes (dead, restarting, failed); front ends read it on every probe, before each
  request (to pick the least loaded engine) and within milliseconds of a change, so
  ``/health`` turns 503 at once when the engine dies, without any message.
"""

from __future__ import annotations

import mmap
import os
import pickle
import secrets
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np

from service.inference.errors import EngineOverloadedError

# --- engine states ------------------------------------------------------------------------

STARTING, LOADING, WARMING, READY, FAILED, DEAD, STOPPED, RESTARTING = range(8)
STATE_NAMES = ("starting", "loading", "warming", "ready", "failed", "dead", "stopped", "restarting")

_BOARD = struct.Struct("<iiiiqq")  # state, generation, pid, restarts, queued tokens, queued inputs
_HEAD = struct.Struct("<iiii")
_LOAD = struct.Struct("<qq")
_LOAD_OFFSET = _HEAD.size


class StatusBoard:
    """An engine's state in a 32-byte shared file: any process opens it by path.

    The supervisor writes the lifecycle fields (state, generation, pid, restarts) and the
    engine writes its state and its load: the tokens and inputs it has admitted and not
    answered, which front ends read to send each request to the least loaded engine. Each
    writer writes only its own fields, so neither undoes the other's."""

    def __init__(self, path: str | Path, *, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            self.path.write_bytes(_BOARD.pack(STARTING, 0, 0, 0, 0, 0))
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _BOARD.size)
        finally:
            os.close(fd)

    def read(self) -> tuple[int, int, int, int]:
        """(state, generation, pid, restarts); a 16-byte read of one page is atomic enough
        for a flag that changes a few times in a process's life."""
        return _HEAD.unpack_from(self._map)  # type: ignore[return-value]

    def load(self) -> tuple[int, int]:
        """(queued tokens, queued inputs) of the engine: admitted, not yet answered."""
        return _LOAD.unpack_from(self._map, _LOAD_OFFSET)  # type: ignore[return-value]

    def set_load(self, tokens: int, inputs: int) -> None:
        _LOAD.pack_into(self._map, _LOAD_OFFSET, tokens, inputs)

    @property
    def state(self) -> int:
        return self.read()[0]

    @property
    def generation(self) -> int:
        return self.read()[1]

    def write(self, state: int, *, generation: int | None = None, pid: int | None = None) -> None:
        old_state, old_gen, old_pid, restarts = self.read()
        _HEAD.pack_into(
            self._map,
            0,
            state,
            old_gen if generation is None else generation,
            old_pid if pid is None else pid,
            restarts,
        )

    def count_restart(self) -> int:
        state, gen, pid, restarts = self.read()
        _HEAD.pack_into(self._map, 0, state, gen, pid, restarts + 1)
        return restarts + 1

    def close(self) -> None:
        self._map.close()


# --- pixels in shared memory --------------------------------------------------------------


@dataclass(frozen=True)
class PixelSlot:
    """Where one input's crops are in a request's segment."""

    offset: int
    shape: tuple[int, ...]


# Tries at a fresh name when a segment's name is taken (64 random bits: never by chance).
SEGMENT_NAME_TRIES = 8


def segment_name(prefix: str) -> str:
    """A new segment's name: ``prefix`` and 64 random bits, so no local user can predict the
    next one and create it first."""
    return f"{prefix}-{secrets.token_hex(8)}"


def _create_segment(prefix: str, size: int) -> shared_memory.SharedMemory:
    """A new segment under a random name; a name already taken (O_EXCL refuses it) is
    replaced by another, never reported to the client."""
    for _ in range(SEGMENT_NAME_TRIES):
        try:
            return shared_memory.SharedMemory(name=segment_name(prefix), create=True, size=size)
        except FileExistsError:
            continue
    raise EngineOverloadedError(
        f"no free shared-memory name found in {SEGMENT_NAME_TRIES} tries; retry later"
    )


def put_pixels(
    arrays: Sequence[np.ndarray | None], prefix: str
) -> tuple[shared_memory.SharedMemory | None, list[PixelSlot | None]]:
    """Copy each input's float32 crops into one new segment named ``prefix``-<random>."""
    sizes = [0 if a is None else int(a.nbytes) for a in arrays]
    total = sum(sizes)
    if total == 0:
        return None, [None] * len(arrays)
    segment = _create_segment(prefix, total)
    try:
        # Reserve the pages now: /dev/shm is a tmpfs, and writing past its size would kill
        # this process with SIGBUS instead of raising (Docker's default is only 64 MB).
        os.posix_fallocate(segment._fd, 0, total)  # type: ignore[attr-defined]
    except OSError:
        release(segment, unlink=True)
        raise EngineOverloadedError(
            "no shared memory left for this request's images (/dev/shm is full); retry later, "
            "or give the server more (Docker: shm_size)"
        ) from None
    slots: list[PixelSlot | None] = []
    offset = 0
    for array in arrays:
        if array is None:
            slots.append(None)
            continue
        view = np.ndarray(array.shape, dtype=np.float32, buffer=segment.buf, offset=offset)
        view[...] = array
        del view
        slots.append(PixelSlot(offset, tuple(array.shape)))
        offset += int(array.nbytes)
    return segment, slots


def open_pixels(name: str) -> shared_memory.SharedMemory:
    """Map a segment a front end created (the front end owns and unlinks it).

    Every process of a server is spawned from the same root and shares its resource
    tracker, where the segment is already registered by its creator: attaching registers
    the same name again (a set, so no change) and the creator's unlink removes it."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    return shared_memory.SharedMemory(name=name)


def view_pixels(segment: shared_memory.SharedMemory, slot: PixelSlot) -> np.ndarray:
    return np.ndarray(slot.shape, dtype=np.float32, buffer=segment.buf, offset=slot.offset)


def release(segment: shared_memory.SharedMemory | None, *, unlink: bool) -> None:
    if segment is None:
        return
    try:
        segment.close()
    except BufferError:  # a view is still alive somewhere: the mapping goes with the process
        pass
    if unlink:
        try:
            segment.unlink()
        except FileNotFoundError:
            pass


# --- messages ------------------------------------------------------------------------------
# Front end -> engine: [b"embed", header] | [b"cancel", header] | [b"hello", b""]
# Engine -> front end: [b"ok", header, vectors] | [b"error", header] | [b"hello", info]

EMBED, CANCEL, HELLO, OK, ERROR = b"embed", b"cancel", b"hello", b"ok", b"error"


def dump(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def load(data: Any) -> Any:
    return pickle.loads(data)  # only between this server's own processes


def endpoint(run_dir: str | Path, name: str) -> str:
    return f"ipc://{Path(run_dir) / name}.sock"
