"""Garbage-collection counters for every process of a benchmarked server (bench only).

``bench/profile_stages.py`` puts this directory first on the server's ``PYTHONPATH`` with
``LLAVE_BENCH_GC_DIR`` set, so every Python process of the server (front ends, engine,
store: spawned children inherit the environment) imports it at start-up. It times every
collection with ``gc.callbacks`` (CPU time of the collecting thread) and writes, twice a
second, ``{"pid", "title", "collections": {gen: n}, "cpu_s": {gen: s}}`` to
``$LLAVE_BENCH_GC_DIR/gc-PID.json``. A sampling profiler cannot show this time: a
collection runs inside whatever allocation triggered it, so its samples land on random
lines of Python code. Without the variable this module does nothing.
"""

from __future__ import annotations

import os

if os.environ.get("LLAVE_BENCH_GC_DIR"):
    import gc
    import json
    import threading
    import time

    _dir = os.environ["LLAVE_BENCH_GC_DIR"]
    _counts = [0, 0, 0]
    _cpu = [0.0, 0.0, 0.0]
    _started = [0.0]

    def _on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            _started[0] = time.thread_time()
        else:
            gen = info.get("generation", 0)
            _counts[gen] += 1
            _cpu[gen] += time.thread_time() - _started[0]

    def _title() -> str:
        try:
            with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
        except OSError:
            return ""

    def _writer() -> None:
        path = os.path.join(_dir, f"gc-{os.getpid()}.json")
        while True:
            time.sleep(0.5)
            data = {
                "pid": os.getpid(),
                "title": _title(),
                "threshold": gc.get_threshold(),
                "collections": dict(enumerate(_counts)),
                "cpu_s": dict(enumerate(_cpu)),
            }
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)

    if os.environ.get("LLAVE_BENCH_GC_FREEZE_SIGNAL"):  # experiments: SIGUSR2 -> gc.freeze()
        import signal

        signal.signal(signal.SIGUSR2, lambda *_: (gc.collect(), gc.freeze()))
    gc.callbacks.append(_on_gc)
    threading.Thread(target=_writer, name="bench-gc-counters", daemon=True).start()
