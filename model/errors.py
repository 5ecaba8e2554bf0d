"""Typed errors raised by the model core.

The service maps these to HTTP statuses in one place (``service/http/errors.py``); the model
core itself knows nothing about HTTP. Every message is written for the caller: it names
the problem and, where it helps, the limit that was exceeded.
"""

from __future__ import annotations


class LlaveError(Exception):
    """Base class of every error the model core raises on purpose."""


class InvalidInputError(LlaveError, ValueError):
    """An input object is malformed (wrong types, unknown fields, empty)."""


class EmptyInputError(InvalidInputError):
    """An input has neither text nor an image."""


class ImageDecodeError(InvalidInputError):
    """Image bytes are not valid base64, or do not decode to an image."""


class ImageTooLargeError(InvalidInputError):
    """An image has more pixels than the configured limit (decompression bomb guard)."""


class TooManyImagesError(InvalidInputError):
    """An input holds more images than the configured limit."""


class VideoDecodeError(InvalidInputError):
    """Video bytes are not a supported container or codec, or are truncated or corrupt."""


class VideoTooLargeError(InvalidInputError):
    """A video is over a limit: bytes, duration, frames, frame size or pixels decoded."""


class InputTooLongError(InvalidInputError):
    """An input is longer than the model's maximum length and truncation was not allowed
    (or the cut would fall inside an image)."""


class CheckpointError(LlaveError):
    """A checkpoint is missing, incomplete, of an unknown architecture or inconsistent."""
