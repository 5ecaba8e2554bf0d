"""The inference layer's own configuration (built from the server's ``Settings`` by
``Settings.engine_config()``; nothing here reads the HTTP settings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from service import limits


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """What the engine process (model, batcher, forward) and its clients need."""

    model: str
    device: str = "auto"
    index: int = 0  # which of the server's engines (one per device; --devices)
    cpu_threads: int | None = None  # torch threads, when several engines share the CPU
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    max_input_tokens: int | None = None
    max_image_pixels: int = limits.MAX_IMAGE_PIXELS
    max_images_per_input: int = limits.MAX_IMAGES_PER_INPUT
    # load_embedder's video keyword arguments (service.limits.video_limits)
    video_limits: dict[str, int | float] = field(default_factory=limits.video_limits)
    # batching
    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    max_wait_ms: float = 50.0
    batch_sort_window: int = 128
    max_queue: int = limits.MAX_QUEUE
    warmup_tokens: int = 256
    gil_switch_interval_ms: float | None = None
    # supervision
    engine_restarts: int = 3
    # clients (front ends)
    request_timeout_s: float = 60.0
    preprocess_workers: int = 2
    max_pixel_bytes: int = limits.MAX_PIXEL_BYTES  # per front end
    # "module:function" called in the engine process with this config instead of
    # model.load_embedder (tests and the simulated-device bench; not a server setting)
    embedder_factory: str | None = None

    def image_limit_kwargs(self) -> dict[str, int | float]:
        return {
            "max_image_pixels": self.max_image_pixels,
            "max_images_per_input": self.max_images_per_input,
            "max_image_bytes": limits.MAX_IMAGE_BYTES,
            **self.video_limits,
        }
