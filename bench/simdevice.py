"""A SIMULATED device for the serving benchmark: the real embedder with a stand-in forward.

The server runs unchanged (HTTP, validation, tokenising, batching, postprocessing); only
the model's forward pass is replaced, in the process that owns the model, by a stand-in
that behaves like a GPU forward as seen from Python:

1. it holds the interpreter for ``launch_ms`` of CPU time (a busy Python loop: the
   Python and C++ that launch the kernels, which hold the GIL; like them it gives the
   GIL up only at the interpreter's switch interval when another thread asks for it);
2. then it sleeps ``device_ms(n)`` with the GIL released (the GPU computing while the
   host thread waits on it);
3. it returns a random ``(n, dim)`` float32 tensor (the pooled vectors).

Calibration (the project's H100 run, bench/README.md: LLaVE-0.5B shapes, 40-token
texts, bf16): about 16 ms for a batch of 1 and 27 ms for a batch of 64, most of batch 1
being launch time. Profile ``h100`` (the default): ``launch_ms = 12`` and
``device_ms(n) = 4 + 11 * (n - 1) / 63``, so 16 ms at 1 and 27 ms at 64 (2,370 inputs/s
offline at 64, against the 2,340/s measured). Profile ``linear`` models a device whose
cost is proportional to the batch (a CPU's): ``launch_ms = 0.5``, ``device_ms(n) = 8 * n``.
Set ``LLAVE_SIM_PROFILE`` (h100, linear) or ``LLAVE_SIM_LAUNCH_MS`` and
``LLAVE_SIM_DEVICE_MS`` (``"first,last"``: device ms at batch 1 and at batch 64,
interpolated linearly) in the server's environment to change it.

What it does not model: launch time that grows with sequence length or batch shape,
host-to-device copies, the GPU's own queue (real launches overlap the GPU's work, here
they strictly precede it), memory limits, and any CPU work a real forward does besides
launching (collation does run: it is the real embedder's, on the CPU).

``load(settings)`` is the factory the server calls in its engine process
(``service.__main__.main(argv, embedder_factory="bench.simdevice:load")``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PROFILES: dict[str, tuple[float, Callable[[int], float]]] = {
    "h100": (12.0, lambda n: 4.0 + 11.0 * (n - 1) / 63.0),
    "linear": (0.5, lambda n: 8.0 * n),
}


@dataclass(frozen=True)
class DeviceProfile:
    """Launch time (GIL held) and device time (GIL released) of one simulated forward."""

    name: str
    launch_ms: float
    device_ms_fn: Callable[[int], float]

    def device_ms(self, n: int) -> float:
        return float(self.device_ms_fn(n))

    def total_ms(self, n: int) -> float:
        return self.launch_ms + self.device_ms(n)

    def describe(self) -> dict[str, Any]:
        return {
            "profile": self.name,
            "launch_ms": self.launch_ms,
            "device_ms": {str(n): round(self.device_ms(n), 3) for n in (1, 8, 32, 64)},
            "total_ms": {str(n): round(self.total_ms(n), 3) for n in (1, 8, 32, 64)},
        }


def profile_from_env(env: dict[str, str] | None = None) -> DeviceProfile:
    env = dict(os.environ if env is None else env)
    name = env.get("LLAVE_SIM_PROFILE", "h100")
    if name not in PROFILES:
        raise ValueError(f"LLAVE_SIM_PROFILE={name!r}: choose from {sorted(PROFILES)}")
    launch, fn = PROFILES[name]
    if "LLAVE_SIM_LAUNCH_MS" in env:
        launch = float(env["LLAVE_SIM_LAUNCH_MS"])
        name = "custom"
    if "LLAVE_SIM_DEVICE_MS" in env:
        first, last = (float(x) for x in env["LLAVE_SIM_DEVICE_MS"].split(","))

        def fn(n: int, first: float = first, last: float = last) -> float:
            return first + (last - first) * (n - 1) / 63.0

        name = "custom"
    return DeviceProfile(name, launch, fn)


def hold_interpreter(seconds: float) -> None:
    """Busy Python for ``seconds`` of this thread's CPU time (the GIL held, as launches do)."""
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        for _ in range(200):
            x += 1


class SimulatedForward:
    """The stand-in forward on its own: ``__call__(n)`` simulates one batch of ``n``."""

    def __init__(self, dim: int, profile: DeviceProfile | None = None, seed: int = 0) -> None:
        import torch

        self.dim = dim
        self.profile = profile or profile_from_env()
        self._torch = torch
        self._gen = torch.Generator().manual_seed(seed)

    def __call__(self, n: int) -> Any:
        hold_interpreter(self.profile.launch_ms / 1000.0)
        time.sleep(self.profile.device_ms(n) / 1000.0)
        return self._torch.randn(n, self.dim, generator=self._gen, dtype=self._torch.float32)


class SimulatedEmbedder:
    """The real embedder, except that ``forward`` is simulated (see the module docstring).

    Every other attribute is the real embedder's (preprocessing, limits, ``dim``,
    ``postprocess``...). ``embed`` is redefined so that it, too, uses the stand-in.
    """

    simulated = True

    def __init__(self, real: Any, profile: DeviceProfile | None = None) -> None:
        self._real = real
        self._forward = SimulatedForward(real.dim, profile)
        self.profile = self._forward.profile

    def forward(self, batch: Sequence[Any]) -> Any:
        self._real.collate(batch)  # the real CPU work of the device stage: padding, tensors
        return self._forward(len(batch))

    def embed(
        self, inputs: Sequence[Any], *, truncate: bool = True, normalize: bool = True, batch_size: int = 16
    ) -> Any:
        import numpy as np

        if isinstance(inputs, (dict, str)):
            inputs = [inputs]
        prepared = [self._real.preprocess(x, truncate=truncate) for x in inputs]
        out = np.zeros((len(prepared), self._real.dim), dtype=np.float32)
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start : start + batch_size]
            out[start : start + len(chunk)] = self._real.postprocess(self.forward(chunk), normalize=normalize)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __repr__(self) -> str:
        return f"SimulatedEmbedder({self._real!r}, {self.profile.describe()})"


def load(settings: Any) -> SimulatedEmbedder:
    """The server's embedder factory: load the real checkpoint on the CPU, simulate its forward.

    ``settings`` is the engine's configuration (``model``, ``max_input_tokens``, image limits).

    The weights are loaded in bfloat16 (they never run; this halves the memory)."""
    import logging

    from model import load_embedder

    kwargs: dict[str, Any] = {}
    if callable(getattr(settings, "image_limit_kwargs", None)):  # the engine's EngineConfig
        kwargs.update(settings.image_limit_kwargs())
    else:  # the old design's server Settings
        for name in ("max_image_pixels", "max_images_per_input"):
            if getattr(settings, name, None) is not None:
                kwargs[name] = getattr(settings, name)
    if getattr(settings, "max_input_tokens", None) is not None:
        kwargs["max_length"] = settings.max_input_tokens
    real = load_embedder(settings.model, device="cpu", dtype="bfloat16", **kwargs)
    sim = SimulatedEmbedder(real)
    logging.getLogger("llave.simdevice").warning(
        "SIMULATED DEVICE: the forward pass is a stand-in (%s); throughput figures are a simulation",
        sim.profile.describe(),
    )
    return sim
