"""A test-only plug-in for the engine process: the real embedder, with injected faults.

``python -m tests.service.fault_server ARGS`` serves like ``python -m service ARGS`` but
loads the model through ``load`` below, which wraps the real embedder's forward pass.
``TEST_LLAVE_FAULTS`` (comma-separated ``KIND:MARKER``) says which faults fire when a
batch holds an input whose text contains MARKER:

- ``fail-batch``: the forward pass raises (that batch fails, the engine goes on);
- ``kill-worker``: the device thread dies as on an unrecoverable device error (the
  engine process exits and is restarted by its supervisor).

Production code has no fault switches: this file is the only place they exist.
"""

from __future__ import annotations

import os
from typing import Any

from service.inference.config import EngineConfig
from service.inference.worker import FatalDeviceError


def _faults() -> list[tuple[str, str]]:
    spec = os.environ.get("TEST_LLAVE_FAULTS", "")
    return [tuple(part.split(":", 1)) for part in spec.split(",") if ":" in part]  # type: ignore[misc]


class FaultyEmbedder:
    """Delegates everything to the real embedder; ``forward`` may fail on a marker."""

    def __init__(self, real: Any, faults: list[tuple[str, str]]) -> None:
        self._real = real
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def forward(self, batch: Any) -> Any:
        tokenizer = self._real.preprocessor.tokenizer
        texts = [tokenizer.decode(p.input_ids) for p in batch]
        for kind, marker in self._faults:
            if any(marker in text for text in texts):
                if kind == "kill-worker":
                    raise FatalDeviceError("injected fault: kill-worker")
                if kind == "fail-batch":
                    raise RuntimeError("injected fault: fail-batch")
        return self._real.forward(batch)


def load(config: EngineConfig) -> Any:
    from service.inference.engine import load_model

    real = load_model(EngineConfig(**{**config.__dict__, "embedder_factory": None}))
    return FaultyEmbedder(real, _faults())
