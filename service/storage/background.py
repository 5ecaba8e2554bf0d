"""Waiting for a store's background threads (index rebuilds, payload-index builds)."""

from __future__ import annotations

import threading
import time


def wait_for_threads(lock: threading.Lock, threads: set[threading.Thread], timeout: float | None) -> bool:
    """Join the threads in ``threads`` (a set their owners add to and discard from under
    ``lock``), also those started meanwhile, until none is left or ``timeout`` seconds have
    passed; True when none is left running."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with lock:
            running = list(threads)
        if not running:
            return True
        for thread in running:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if deadline is not None and time.monotonic() >= deadline:
            with lock:
                return not threads
