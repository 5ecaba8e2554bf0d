"""Parse API input objects and decode their images, with limits.

An input object is either the shorthand ``{"text"?, "image"?, "instruction"?}`` or the
interleaved ``{"content": [{"type": "text", "text": ...} | {"type": "image", "image":
...}], "instruction"?}``. An image is base64 text, a ``data:`` URI, raw bytes or a PIL
image. Remote URLs are not fetched here: the service resolves allow-listed URLs to bytes
first, so the model core never touches the network.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import (
    EmptyInputError,
    ImageDecodeError,
    ImageTooLargeError,
    InvalidInputError,
    TooManyImagesError,
)

SHORTHAND_KEYS = frozenset({"text", "image", "video", "instruction"})
MEDIA_KINDS = ("image", "video")
INTERLEAVED_KEYS = frozenset({"content", "instruction"})
_SURROGATE = re.compile("[\ud800-\udfff]")
# Raster formats accepted; everything else Pillow could open (EPS would run Ghostscript,
# plus PDF, PSD, TGA, ...) is refused before any decoder is tried.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "ICO")  # JPEG covers MPO files too
_DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I
)


@dataclass(frozen=True, kw_only=True)
class ImageLimits:
    """Limits applied while decoding images (all configurable by the caller)."""

    max_pixels: int = 40_000_000
    max_images: int = 8
    max_bytes: int = 32 * 1024 * 1024
    max_aspect_ratio: float = 100.0


@dataclass
class ParsedInput:
    """An input object reduced to ordered parts: text strings and ``None`` per image."""

    parts: list[str | None]
    instruction: str | None
    images: list[Any] = field(default_factory=list)  # raw image payloads, in order
    interleaved: bool = False  # given as a 'content' list (not the text/image shorthand)
    # Every image and video in order, as (kind, payload): one per ``None`` of ``parts``.
    # A video takes one ``<image>`` place, as in the authors' code.
    media: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def videos(self) -> list[Any]:
        return [value for kind, value in self.media if kind == "video"]


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string, got {type(value).__name__}")
    if _SURROGATE.search(value):  # JSON allows "\ud800"; no tokenizer can encode it
        raise InvalidInputError(f"{what} holds a lone UTF-16 surrogate (not valid Unicode text)")
    return value


def parse_input(obj: Any, limits: ImageLimits | None = None, *, max_videos: int = 1) -> ParsedInput:
    """Validate the shape of one input object and return its ordered parts."""
    limits = limits or ImageLimits()
    if isinstance(obj, str):
        obj = {"text": obj}
    if not isinstance(obj, dict):
        raise InvalidInputError(f"an input must be an object, got {type(obj).__name__}")
    instruction = obj.get("instruction")
    if instruction is not None:
        instruction = _check_text(instruction, "instruction") or None

    parts: list[str | None] = []
    media: list[tuple[str, Any]] = []
    if "content" in obj:
        unknown = set(obj) - INTERLEAVED_KEYS
        if unknown:
            raise InvalidInputError(
                f"unknown field(s) {sorted(unknown)} in an interleaved input (use 'content' and 'instruction')"
            )
        content = obj["content"]
        if not isinstance(content, list):
            raise InvalidInputError("'content' must be a list of parts")
        for i, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise InvalidInputError(f"content[{i}] must be an object with a 'type'")
            kind = part["type"]
            if kind == "text":
                if set(part) - {"type", "text"}:
                    raise InvalidInputError(f"content[{i}]: a text part holds only 'type' and 'text'")
                parts.append(_check_text(part.get("text"), f"content[{i}].text"))
            elif kind in MEDIA_KINDS:
                if set(part) - {"type", kind} or part.get(kind) is None:
                    article = "an" if kind == "image" else "a"
                    raise InvalidInputError(f"content[{i}]: {article} {kind} part holds 'type' and '{kind}'")
                parts.append(None)
                media.append((kind, part[kind]))
            else:
                raise InvalidInputError(f"content[{i}].type must be 'text', 'image' or 'video', got {kind!r}")
    else:
        unknown = set(obj) - SHORTHAND_KEYS
        if unknown:
            raise InvalidInputError(
                f"unknown field(s) {sorted(unknown)} (an input has 'text', 'image', 'video', 'instruction' "
                "or 'content')"
            )
        if obj.get("image") is not None and obj.get("video") is not None:
            raise InvalidInputError("give 'image' or 'video', not both (a 'content' list can hold both)")
        for kind in MEDIA_KINDS:
            if obj.get(kind) is not None:
                parts.append(None)
                media.append((kind, obj[kind]))
        if obj.get("text") is not None:
            parts.append(_check_text(obj["text"], "text"))

    images = [value for kind, value in media if kind == "image"]
    if not media and not any(p for p in parts if p) and not instruction:
        raise EmptyInputError("input is empty: give text, an image, a video or content parts")
    if len(images) > limits.max_images:
        raise TooManyImagesError(f"input holds {len(images)} images; the limit is {limits.max_images}")
    videos = len(media) - len(images)
    if videos > max_videos:
        raise TooManyImagesError(f"input holds {videos} videos; the limit is {max_videos}")
    return ParsedInput(
        parts=parts, instruction=instruction, images=images, interleaved="content" in obj, media=media
    )


def payload_bytes(
    value: Any, max_bytes: int, what: str, bad: type[Exception], too_large: type[Exception]
) -> bytes:
    """Turn a media payload (base64 text, data URI or bytes) into raw bytes, refusing
    URLs (the service resolves those), bad base64 and more than ``max_bytes``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        if text[:8].lower().startswith(("http://", "https://")):
            raise bad(f"remote {what} URLs must be resolved by the caller (the service's allow-list)")
        match = _DATA_URI.match(text)
        if match:
            if not match.group("b64"):
                raise bad("data: URIs must be base64-encoded")
            text = text[match.end() :]
        if len(text) > max_bytes * 4 // 3 + 4:
            raise too_large(f"{what} payload is larger than {max_bytes} bytes")
        try:
            raw = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad(f"{what} is not valid base64") from exc
    else:
        article = "an" if what[0] in "aeiou" else "a"
        raise bad(f"{article} {what} must be base64 text, a data: URI or bytes, got {type(value).__name__}")
    if not raw:
        raise bad(f"{what} is empty")
    if len(raw) > max_bytes:
        raise too_large(f"{what} is {len(raw)} bytes; the limit is {max_bytes}")
    return raw


def image_bytes(value: Any, limits: ImageLimits) -> bytes:
    """Turn an image payload (base64 text, data URI or bytes) into raw bytes."""
    return payload_bytes(value, limits.max_bytes, "image", ImageDecodeError, ImageTooLargeError)


def _open(value: Any, limits: ImageLimits) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    raw = image_bytes(value, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image exceeds the pixel limit of {limits.max_pixels}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError("image could not be decoded (unknown or corrupt format)") from exc


def open_image(value: Any, limits: ImageLimits) -> Image.Image:
    """Open an image payload lazily: the header is read and checked, no pixel is decoded
    (``decode_image`` of the result decodes it)."""
    img = _open(value, limits)
    _check_geometry(img.width, img.height, limits)
    return img


def image_size(value: Any, limits: ImageLimits) -> tuple[int, int]:
    """Return (height, width) from the image header, without decoding pixels."""
    img = open_image(value, limits)
    return img.height, img.width


def _check_geometry(width: int, height: int, limits: ImageLimits) -> None:
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise ImageDecodeError(
            f"image aspect ratio {width}x{height} exceeds the limit of {limits.max_aspect_ratio:g}:1"
        )


def decode_image(value: Any, limits: ImageLimits) -> Image.Image:
    """Decode an image payload to an RGB PIL image, enforcing the limits.

    The pixel limit is checked from the header before any pixel is decoded. Animated
    images use their first frame; 16-bit, CMYK, palette and alpha images become RGB (as
    the authors' ``Image.open(...).convert("RGB")``).
    """
    img = _open(value, limits)
    _check_geometry(img.width, img.height, limits)
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
        if img.mode != "RGB":
            img = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError("image could not be decoded (truncated or corrupt data)") from exc
    return img
