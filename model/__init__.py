"""LLaVE model core: load a checkpoint and turn inputs into embeddings.

``from model import load_embedder``; see ``model/embedder.py`` for the three stages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .embedder import Embedder, Preprocessor

from .errors import CheckpointError, InvalidInputError, LlaveError
from .inputs import ImageLimits
from .video import VideoLimits

# The embedder (and with it torch and transformers) is imported on first use, so that
# ``model.errors`` and ``model.inputs`` stay cheap to import for code that only needs them.
_LAZY = {"Embedder", "EmbedderConfig", "PreparedInput", "Preprocessor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import embedder

        return getattr(embedder, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "Embedder",
    "EmbedderConfig",
    "ImageLimits",
    "InvalidInputError",
    "LlaveError",
    "PreparedInput",
    "Preprocessor",
    "load_embedder",
    "load_preprocessor",
]


def load_embedder(
    path_or_id: Any,
    device: str = "auto",
    dtype: Any = "auto",
    *,
    max_length: int | None = None,
    max_image_pixels: int = 40_000_000,
    max_images_per_input: int = 8,
    max_image_bytes: int = 32 * 1024 * 1024,
    max_video_bytes: int = 32 * 1024 * 1024,
    max_video_seconds: float = 600.0,
    max_video_stream_frames: int = 36_000,
    max_video_frame_pixels: int = 3840 * 2160,
    max_video_decoded_pixels: int = 2_000_000_000,
    video_max_length: int = 8192,
    attn_implementation: str = "sdpa",
) -> Embedder:
    """Load a LLaVE checkpoint (HF or authors' layout, local folder or hub id).

    ``device="auto"`` picks CUDA when present, else CPU; ``dtype="auto"`` is bfloat16 on
    CUDA and float32 on CPU. ``max_length`` defaults to the checkpoint's
    ``tokenizer_model_max_length`` (4096 for the published LLaVE models); an input holding
    a video is cut at ``video_max_length`` instead (the authors' retrieval script: 8192).
    """
    from .checkpoint import load_checkpoint
    from .embedder import Embedder

    loaded = load_checkpoint(path_or_id, device=device, dtype=dtype, attn_implementation=attn_implementation)
    config = _embedder_config(
        loaded.model.config,
        max_length or loaded.max_length,
        max_image_pixels=max_image_pixels,
        max_images_per_input=max_images_per_input,
        max_image_bytes=max_image_bytes,
        max_video_bytes=max_video_bytes,
        max_video_seconds=max_video_seconds,
        max_video_stream_frames=max_video_stream_frames,
        max_video_frame_pixels=max_video_frame_pixels,
        max_video_decoded_pixels=max_video_decoded_pixels,
        video_max_length=video_max_length,
    )
    return Embedder(
        loaded.model, loaded.tokenizer, loaded.image_processor, name=str(path_or_id), config=config
    )


def _embedder_config(model_config: Any, max_length: int, **limits: Any) -> Any:
    """``limits``: ``load_embedder``'s image and video keyword arguments (the video ones may
    be left out: their defaults are ``VideoLimits``'s)."""
    from .embedder import EmbedderConfig

    video = VideoLimits()
    return EmbedderConfig(
        max_length=max_length,
        image_limits=ImageLimits(
            max_pixels=limits["max_image_pixels"],
            max_images=limits["max_images_per_input"],
            max_bytes=limits["max_image_bytes"],
        ),
        vision_aspect_ratio=getattr(model_config, "vision_aspect_ratio", "anyres_max_9"),
        video_limits=VideoLimits(
            max_bytes=limits.get("max_video_bytes", video.max_bytes),
            max_seconds=limits.get("max_video_seconds", video.max_seconds),
            max_stream_frames=limits.get("max_video_stream_frames", video.max_stream_frames),
            max_frame_pixels=limits.get("max_video_frame_pixels", video.max_frame_pixels),
            max_decoded_pixels=limits.get("max_video_decoded_pixels", video.max_decoded_pixels),
        ),
        video_max_length=limits.get("video_max_length", 8192),
    )


def load_preprocessor(
    path_or_id: Any,
    *,
    max_length: int | None = None,
    max_image_pixels: int = 40_000_000,
    max_images_per_input: int = 8,
    max_image_bytes: int = 32 * 1024 * 1024,
    **video_limits: Any,
) -> Preprocessor:
    """The :class:`Preprocessor` that ``load_embedder`` with the same arguments would build,
    without reading the weights (for processes that only preprocess). ``video_limits``:
    ``load_embedder``'s ``max_video_*`` and ``video_max_length``."""
    from .checkpoint import load_preprocessing
    from .embedder import Preprocessor

    files = load_preprocessing(path_or_id)
    config = _embedder_config(
        files.config,
        max_length or files.max_length,
        max_image_pixels=max_image_pixels,
        max_images_per_input=max_images_per_input,
        max_image_bytes=max_image_bytes,
        **video_limits,
    )
    return Preprocessor(files.tokenizer, files.image_processor, files.config, config)
