"""A budget of bytes held at once by one process (decoded pixels, request bodies).

Single-threaded by design: every caller runs on the process's event loop, so ``take`` and
``give_back`` need no lock. Nothing waits for room: a caller that does not fit answers 429
at once (the client retries after ``Retry-After``), so a full budget never builds a queue.
"""

from __future__ import annotations

from typing import Any


class ByteBudget:
    def __init__(self, capacity: int, gauge: Any = None) -> None:
        if capacity < 1:
            raise ValueError("a byte budget holds at least one byte")
        self.capacity = capacity
        self.used = 0
        self._gauge = gauge  # a prometheus Gauge set to what is held, or None

    def take(self, n: int) -> bool:
        """Hold ``n`` more bytes if they fit; False (nothing held) when they do not."""
        if n < 0:
            raise ValueError("negative bytes")
        if self.used + n > self.capacity:
            return False
        if n:  # a shared gauge write per call otherwise (a text request holds no pixels)
            self.used += n
            self._report()
        return True

    def give_back(self, n: int) -> None:
        if not 0 <= n <= self.used:
            raise ValueError(f"giving back {n} bytes of {self.used} held")
        if n:
            self.used -= n
            self._report()

    def _report(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.used)
