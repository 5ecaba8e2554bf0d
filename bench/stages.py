"""Stages of a served request, from py-spy samples (``py-spy record --native -f raw``).

A sample is a stack, innermost frame last. Its stage is decided from the inside out:

1. native frames below the innermost Python frame: a blocking wait (epoll, a lock, a
   condition variable, the GIL) makes the sample **idle** (dropped: it is not CPU time;
   py-spy's own idle test lets some through); ``gc_collect_main`` makes it **garbage
   collection** (a collection runs inside whatever allocation triggered it, so without
   native frames its time lands on random Python lines);
2. otherwise the innermost Python frame whose file belongs to a stage decides (generic
   frames such as asyncio, contextlib, threading and the process's outer frames are
   skipped, so a ``ThreadPoolExecutor.submit`` called from the engine client counts for
   the client's stage);
3. a stack with no deciding frame is the event loop's own C code (uvloop: the transports,
   the HTTP parser's callbacks, timers).

Stages depend on the process: ``model/`` code is tokenising in a front end and collation
in the engine. ``stage_ms(...)`` turns sample shares into milliseconds of CPU per request
with each thread's measured CPU time (``/proc``), so the sampling only splits time that
was measured exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

IDLE = "idle"
GC = "garbage collection"
INSTRUMENT = "benchmark instrumentation (not server work)"
LOOP = "event loop, transports (uvloop/asyncio, C)"

# Native functions that mean "waiting, not running" when they are below the last Python frame.
_IDLE_NATIVE = re.compile(
    r"^(epoll_p?wait|e?poll|select|pselect6?|pthread_cond_(timed)?wait|PyThread_acquire_lock_timed|"
    r"sem_(timed)?wait|(clock_)?nanosleep|__futex_abstimed_wait\w*|take_gil|PyEval_RestoreThread|"
    r"\w*PyEval_RestoreThread\w*|drop_gil|uv__io_poll|zmq_poll|recvmsg|accept4?)$"
)
_GC_NATIVE = re.compile(r"^(gc_collect_main|gc_collect_with_callback|gc_collect_generations|collect)$")

# Frames that never decide: generic machinery and the outer frames every stack shares.
_TRANSPARENT = (
    "asyncio/", "contextlib.py", "threading.py", "concurrent/", "functools.py", "<frozen", "typing.py",
    "enum.py", "weakref", "_weakrefset.py", "selectors.py", "queue.py", "collections/", "abc.py",
    "multiprocessing/", "runpy", "uvicorn/server.py", "uvicorn/_compat.py", "uvicorn/main.py",
    "service/server.py", "service/__main__.py", "simserver.py", "<string>", "copy.py",
)  # fmt: skip
_OUTER_FUNCTIONS = {"main", "run", "EngineServer.run", "DeviceWorker._main", "_run_module_as_main"}

# (stage, path prefixes, function-name prefixes or None) in the order they are tried on a frame.
FRONT_END: list[tuple[str, tuple[str, ...], tuple[str, ...] | None]] = [
    ("metrics (prometheus_client)", ("prometheus_client/",), None),
    ("tokenising (preprocess threads)", ("model/", "tokenizers/", "transformers/", "PIL/", "torch/"), None),
    ("tokenising (preprocess threads)", ("service/inference/client.py",), ("EngineClient._preprocess_one",)),
    ("preprocess dispatch (thread pool)", ("service/inference/client.py",), ("EngineClient._preprocess_all",)),
    ("IPC: messages (zmq, pickle)", ("zmq/", "service/inference/ipc.py", "pickle"), None),
    ("IPC: messages (zmq, pickle)", ("service/inference/client.py",), ("EngineClient._receive",)),
    ("normalising (numpy)", ("service/vectors.py", "numpy/"), None),
    ("validation, JSON parsing (pydantic, FastAPI)",
     ("pydantic", "fastapi/dependencies/", "fastapi/_compat", "json/", "email/", "service/http/schemas.py",
      "starlette/requests.py"), None),
    ("response rendering (route, orjson, Response)",
     ("service/http/routes/", "starlette/responses.py", "fastapi/responses.py", "fastapi/encoders.py"), None),
    ("our middleware (accounting, body limit, guards)",
     ("service/http/app.py", "service/http/security.py", "service/http/connections.py", "service/budget.py"),
     None),
    ("routing, framework middleware (FastAPI, Starlette)", ("fastapi/", "starlette/"), None),
    ("HTTP server (uvicorn, httptools)", ("uvicorn/", "httptools/"), None),
    ("admission, engine client", ("service/inference/",), None),
    ("other Python", ("",), None),
]  # fmt: skip

ENGINE: list[tuple[str, tuple[str, ...], tuple[str, ...] | None]] = [
    ("metrics (prometheus_client)", ("prometheus_client/",), None),
    ("simulated launches (the stand-in device, not server work)", ("simdevice.py",), None),
    ("collation (model/, torch)", ("model/", "torch/", "transformers/", "numpy/"), None),
    ("IPC: messages (zmq, pickle)", ("zmq/", "service/inference/ipc.py", "pickle"), None),
    ("IPC: messages (zmq, pickle)", ("service/inference/engine.py",), ("EngineServer._receive",)),
    ("batching (service/inference/batching.py)", ("service/inference/batching.py",), None),
    ("device-thread handoff (worker.py)", ("service/inference/worker.py",), None),
    ("per-request work (engine.py)", ("service/inference/",), None),
    ("other Python", ("",), None),
]  # fmt: skip

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse_raw(text: str) -> list[tuple[int, str, list[tuple[str, str, bool]], int]]:
    """py-spy's raw format (``--threads``): (tid, thread name, frames, count) per line;
    frames are (function, file, is_python), outermost first."""
    out = []
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        head, *rest = stack.split(";")
        m = re.match(r"thread \((?:0x)?([0-9a-fA-F]+)\): ?(.*)$", head)
        if m is None:
            continue
        tid = int(m.group(1), 16 if head.startswith("thread (0x") else 10)
        frames = []
        for raw in rest:
            f = _FRAME.match(raw.strip())
            if f is None:
                frames.append((raw.strip(), "", False))
                continue
            file = f.group("file")
            python = bool(f.group("line")) and (file.endswith(".py") or file.startswith("<"))
            frames.append((f.group("func"), file, python))
        out.append((tid, m.group(2) or "?", frames, int(n)))
    return out


def classify(frames: list[tuple[str, str, bool]], role: str) -> str:
    """The stage of one sample (``role``: "front end" or "engine")."""
    rules = ENGINE if role == "engine" else FRONT_END
    last_py = max((i for i, f in enumerate(frames) if f[2]), default=-1)
    if any(
        (not python and _GC_NATIVE.match(func)) or (func == "_on_gc" and file == "sitecustomize.py")
        for func, file, python in frames
    ):
        return GC  # anywhere: the counters' gc.callbacks run Python inside a collection
    if any(_IDLE_NATIVE.match(func) for func, _file, _py in frames[last_py + 1 :]):
        return IDLE
    for func, file, python in reversed(frames[: last_py + 1]):
        if not python or file.startswith(_TRANSPARENT) or func in _OUTER_FUNCTIONS:
            continue
        for stage, prefixes, funcs in rules:
            if file.startswith(prefixes) and (funcs is None or func.startswith(funcs)):
                return stage
    return LOOP


def thread_shares(samples: Iterable[tuple[int, str, list[Any], int]], role: str) -> dict[int, dict[str, Any]]:
    """Per thread id: its name, and the share of its non-idle samples in each stage."""
    counts: dict[int, dict[str, int]] = {}
    names: dict[int, str] = {}
    for tid, name, frames, n in samples:
        names[tid] = name
        stage = INSTRUMENT if name.startswith("bench-") else classify(frames, role)
        counts.setdefault(tid, {})
        counts[tid][stage] = counts[tid].get(stage, 0) + n
    out = {}
    for tid, per in counts.items():
        busy = sum(v for k, v in per.items() if k != IDLE)
        out[tid] = {
            "name": names[tid],
            "samples": busy,
            "idle_samples": per.get(IDLE, 0),
            "shares": {k: v / busy for k, v in per.items() if k != IDLE} if busy else {},
        }
    return out


def stage_ms(
    shares: dict[int, dict[str, Any]],
    thread_cpu_s: dict[int, float],
    comms: dict[int, str],
    requests: int,
    gc_s: float | None = None,
) -> dict[str, float]:
    """Milliseconds of CPU per request in each stage: every thread's measured CPU split by its
    sample shares. Threads py-spy never saw busy are native (ZeroMQ's I/O thread; the
    tokenizers library's rayon pool, named like the process). ``gc_s``, when given, is the
    process's exact collection time (``gc.callbacks``): it replaces the sampled estimate,
    and the Python threads' other stages share the rest (collections are few and long, so
    a 10 s sample of them is noisy)."""
    out: dict[str, float] = {}
    per_ms = 1000.0 / max(requests, 1)
    python: dict[str, float] = {}
    for tid, cpu in thread_cpu_s.items():
        info = shares.get(tid)
        if info is None or not info["shares"]:
            comm = comms.get(tid, "")
            stage = (
                "IPC: ZeroMQ I/O thread (native)"
                if comm.startswith("ZMQbg")
                else "native threads (tokenizers' rayon pool)"
            )
            out[stage] = out.get(stage, 0.0) + cpu * per_ms
            continue
        for stage, share in info["shares"].items():
            python[stage] = python.get(stage, 0.0) + cpu * per_ms * share
    if gc_s is not None and gc_s == gc_s:
        total = sum(python.values())
        sampled_gc = python.pop(GC, 0.0)
        exact = min(gc_s * per_ms, total)
        rest = total - sampled_gc
        scale = (total - exact) / rest if rest > 0 else 0.0
        python = {k: v * scale for k, v in python.items()}
        python[GC] = exact
    for stage, ms in python.items():
        out[stage] = out.get(stage, 0.0) + ms
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
