"""A test-only plug-in for the engine process: the real embedder, with injected faults.

``python -m tests.service.fault_server ARGS`` serves like ``python -m service ARGS`` but
loads the model through ``load`` below, which wraps the real embedder's forward pass.
``TEST_LLAVE_FAULTS`` (comma-separated ``KIND:MARKER``) says which faults fire when a
batch holds an input whose text contains MARKER:

- ``fail-batch``: the forward pass raises (that batch fails, the engine goes on);
- ``kill-worker``: the device thread dies as on an unrecoverable device error (the
  engine process exits and is restarted by its supervisor);
- ``hold-batch``: the forward pass creates ``$TEST_LLAVE_GATE/entered``, then waits until
  the test creates ``$TEST_LLAVE_GATE/open`` (at most ``HOLD_MAX_S``), then runs: the test
  knows, without timing, that the request is in flight and when it may finish;
- ``preprocess-stopiteration``, ``preprocess-interrupt``, ``preprocess-baseexception``,
  ``preprocess-error``: preprocessing an input whose text contains MARKER (in a front end)
  raises ``StopIteration``, ``KeyboardInterrupt``, a bare ``BaseException`` subclass, or a
  plain ``RuntimeError``.

The batch job's model actors (``service.batch``) take two more, through
``ModelSpec.embedder_factory``: ``kill_batch_actor`` and ``hold_batch_actor`` below.

Production code has no fault switches: this file is the only place they exist.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from service.inference.config import EngineConfig
from service.inference.worker import FatalDeviceError

HOLD_MAX_S = 120.0  # a test that never opens the gate fails, it does not hang the engine


def _hold() -> None:
    gate = Path(os.environ["TEST_LLAVE_GATE"])
    (gate / "entered").touch()
    deadline = time.monotonic() + HOLD_MAX_S
    while not (gate / "open").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _faults() -> list[tuple[str, str]]:
    spec = os.environ.get("TEST_LLAVE_FAULTS", "")
    return [tuple(part.split(":", 1)) for part in spec.split(",") if ":" in part]  # type: ignore[misc]


class InjectedBaseException(BaseException):
    """Neither an ``Exception`` nor one of Python's own: what no code should catch blindly."""


PREPROCESS_FAULTS = {
    "preprocess-stopiteration": lambda: StopIteration("injected"),
    "preprocess-interrupt": lambda: KeyboardInterrupt("injected"),
    "preprocess-baseexception": lambda: InjectedBaseException("injected"),
    "preprocess-error": lambda: RuntimeError("injected fault: preprocess-error"),
}


class FaultyPreprocessor:
    """The real preprocessor (pickled to the front ends with it); ``preprocess`` may raise."""

    def __init__(self, real: Any, faults: list[tuple[str, str]]) -> None:
        self.real = real
        self.faults = [(k, m) for k, m in faults if k in PREPROCESS_FAULTS]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "real" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.real, name)

    def preprocess(self, inp: Any, **kwargs: Any) -> Any:
        text = str(inp)
        for kind, marker in self.faults:
            if marker in text:
                raise PREPROCESS_FAULTS[kind]()
        return self.real.preprocess(inp, **kwargs)


class FaultyEmbedder:
    """Delegates everything to the real embedder; ``forward`` may fail on a marker."""

    def __init__(self, real: Any, faults: list[tuple[str, str]]) -> None:
        self._real = real
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    @property
    def preprocessor(self) -> Any:
        if any(kind in PREPROCESS_FAULTS for kind, _ in self._faults):
            return FaultyPreprocessor(self._real.preprocessor, self._faults)
        return self._real.preprocessor

    def forward(self, batch: Any) -> Any:
        tokenizer = self._real.preprocessor.tokenizer
        texts = [tokenizer.decode(p.input_ids) for p in batch]
        for kind, marker in self._faults:
            if any(marker in text for text in texts):
                if kind == "kill-worker":
                    raise FatalDeviceError("injected fault: kill-worker")
                if kind == "fail-batch":
                    raise RuntimeError("injected fault: fail-batch")
                if kind == "hold-batch":
                    _hold()
        return self._real.forward(batch)


def load(config: EngineConfig) -> Any:
    from service.inference.engine import load_model

    real = load_model(EngineConfig(**{**config.__dict__, "embedder_factory": None}))
    return FaultyEmbedder(real, _faults())


# --- the batch job's model actors (service.batch, ModelSpec.embedder_factory) ---------------
# $TEST_LLAVE_BATCH_FAULTS names a folder; it is set before the test's Ray cluster starts, so
# every worker process inherits it. A fault fires on the BATCH_FAULT_AT-th forward of an actor
# process, once: the process that fires it first creates its marker file (O_EXCL, one winner)
# holding its pid, so the actor Ray restarts afterwards runs normally.
BATCH_FAULT_AT = 3


def _claim(name: str) -> bool:
    marker = Path(os.environ["TEST_LLAVE_BATCH_FAULTS"]) / name
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


class _BatchFaultEmbedder:
    def __init__(self, real: Any, name: str, fire: Any) -> None:
        self._real, self._name, self._fire = real, name, fire
        self._forwards = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def forward(self, batch: Any) -> Any:
        self._forwards += 1
        if self._forwards == BATCH_FAULT_AT and _claim(self._name):
            self._fire()
        return self._real.forward(batch)


def _batch_model(job: Any) -> Any:
    from dataclasses import replace

    from service.batch.stages import load_model

    return load_model(replace(job, model=replace(job.model, embedder_factory=None)))


def kill_batch_actor(job: Any) -> Any:
    """The actor SIGKILLs its own process in the middle of a block (marker ``killed``)."""
    return _BatchFaultEmbedder(_batch_model(job), "killed", lambda: os.kill(os.getpid(), signal.SIGKILL))


def hold_batch_actor(job: Any) -> Any:
    """The actor waits in the middle of a block (marker ``held``) until the test creates
    ``$TEST_LLAVE_BATCH_FAULTS/open`` (at most ``HOLD_MAX_S``)."""

    def hold() -> None:
        gate = Path(os.environ["TEST_LLAVE_BATCH_FAULTS"])
        deadline = time.monotonic() + HOLD_MAX_S
        while not (gate / "open").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    return _BatchFaultEmbedder(_batch_model(job), "held", hold)
