"""LLaVE model core: load a checkpoint and turn inputs into embeddings.

``from model import load_embedder``; see ``model/embedder.py`` for the three stages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .embedder import Embedder, Preprocessor

from .errors import CheckpointError, InvalidInputError, LlaveError
from .inputs import ImageLimits

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
    attn_implementation: str = "sdpa",
) -> Embedder:
    """Load a LLaVE checkpoint (HF or authors' layout, local folder or hub id).

    ``device="auto"`` picks CUDA when present, else CPU; ``dtype="auto"`` is bfloat16 on
    CUDA and float32 on CPU. ``max_length`` defaults to the checkpoint's
    ``tokenizer_model_max_length`` (4096 for the published LLaVE models).
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
    )
    return Embedder(
        loaded.model, loaded.tokenizer, loaded.image_processor, name=str(path_or_id), config=config
    )


def _embedder_config(model_config: Any, max_length: int, **limits: int) -> Any:
    from .embedder import EmbedderConfig

    return EmbedderConfig(
        max_length=max_length,
        image_limits=ImageLimits(
            max_pixels=limits["max_image_pixels"],
            max_images=limits["max_images_per_input"],
            max_bytes=limits["max_image_bytes"],
        ),
        vision_aspect_ratio=getattr(model_config, "vision_aspect_ratio", "anyres_max_9"),
    )


def load_preprocessor(
    path_or_id: Any,
    *,
    max_length: int | None = None,
    max_image_pixels: int = 40_000_000,
    max_images_per_input: int = 8,
    max_image_bytes: int = 32 * 1024 * 1024,
) -> Preprocessor:
    """The :class:`Preprocessor` that ``load_embedder`` with the same arguments would build,
    without reading the weights (for processes that only preprocess)."""
    from .checkpoint import load_preprocessing
    from .embedder import Preprocessor

    files = load_preprocessing(path_or_id)
    config = _embedder_config(
        files.config,
        max_length or files.max_length,
        max_image_pixels=max_image_pixels,
        max_images_per_input=max_images_per_input,
        max_image_bytes=max_image_bytes,
    )
    return Preprocessor(files.tokenizer, files.image_processor, files.config, config)
