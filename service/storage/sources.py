"""What a document was made from: the text of its input and a thumbnail of each image.

A collection keeps sources when its ``store_source`` option is on (the default for
collections created by this version; collections from earlier versions report it off
until ``PUT /collections/{name}`` turns it on). Both store backends write a document's
source in the same transaction as its vector, so it is stored all or nothing and
survives exactly what the vector survives; replacing a document replaces its source
(a replacement without one leaves none), deleting it deletes it.

- ``text``: the input's text parts in order, joined with ``"\\n"`` (``None`` when it has
  none; NUL characters dropped). The instruction is a task prompt, not document content:
  it is not kept.
- thumbnails: one per image, in input order: EXIF orientation applied, RGB, the longest
  side scaled down to the collection's ``thumbnail_size`` (never up), encoded as WebP or
  JPEG (``thumbnail_format``). A video's is its poster frame (its first frame, as decoded
  for the model), with the video's duration: ``Thumbnail.seconds``, kept in the stored media
  type as a parameter (``image/webp; video-seconds=12.345``), so both store backends and
  ``service.migrate`` keep it with no column of its own.

Every limit on sources is defined here, once.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.storage.errors import DocumentNotFoundError, InvalidParameterError

SOURCE_DEFAULTS: dict[str, Any] = {"store_source": True, "thumbnail_size": 256, "thumbnail_format": "webp"}
# A collection created before sources existed keeps none until it is told to.
LEGACY_SOURCE_OPTIONS: dict[str, Any] = {**SOURCE_DEFAULTS, "store_source": False}
THUMBNAIL_MEDIA_TYPES = {"webp": "image/webp", "jpeg": "image/jpeg"}
THUMBNAIL_QUALITY = {"webp": 80, "jpeg": 85}
# The limits (thumbnail side, text and thumbnail bytes per document) are service/limits.py's.
from service.limits import (  # noqa: E402
    MAX_SOURCE_TEXT_BYTES,
    MAX_THUMBNAIL_BYTES_PER_DOCUMENT,
    MAX_THUMBNAIL_SIZE,
    MAX_THUMBNAILS_PER_DOCUMENT,
    MIN_THUMBNAIL_SIZE,
)


class SourceTooLargeError(InvalidParameterError):
    """A document's text or thumbnails exceed the per-document source limits."""


class ThumbnailNotFoundError(DocumentNotFoundError):
    """The document exists but has no thumbnail at that index (404)."""


VIDEO_SECONDS_PARAMETER = "video-seconds"


@dataclass(frozen=True)
class Thumbnail:
    media_type: str  # image/webp or image/jpeg
    data: bytes
    seconds: float | None = None  # the video's duration when this is a video's poster frame

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.data).hexdigest()[:32] + '"'

    @property
    def stored_type(self) -> str:
        """The media type as the stores keep it (with the video's duration, if any)."""
        if self.seconds is None:
            return self.media_type
        return f"{self.media_type}; {VIDEO_SECONDS_PARAMETER}={self.seconds:.3f}"

    @classmethod
    def from_stored(cls, stored_type: str, data: bytes) -> Thumbnail:
        media_type, _, parameter = stored_type.partition(";")
        name, _, value = parameter.strip().partition("=")
        seconds = float(value) if name == VIDEO_SECONDS_PARAMETER else None
        return cls(media_type.strip(), bytes(data), seconds)


def video_durations(stored_types: Sequence[str] | None) -> list[dict[str, Any]]:
    """``[{"thumbnail": i, "seconds": s}]`` for the thumbnails that are videos' posters."""
    out = []
    for i, stored in enumerate(stored_types or ()):
        seconds = Thumbnail.from_stored(stored, b"").seconds
        if seconds is not None:
            out.append({"thumbnail": i, "seconds": seconds})
    return out


@dataclass(frozen=True)
class Source:
    text: str | None = None
    thumbnails: tuple[Thumbnail, ...] = ()

    @property
    def empty(self) -> bool:
        return self.text is None and not self.thumbnails


def resolve_source_options(
    given: Mapping[str, Any] | None, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``base`` (default: ``SOURCE_DEFAULTS``) updated with the checked ``given`` options."""
    resolved = dict(SOURCE_DEFAULTS if base is None else base)
    for key, value in (given or {}).items():
        if value is None:
            continue
        if key == "store_source":
            if not isinstance(value, bool):
                raise InvalidParameterError("store_source must be true or false")
        elif key == "thumbnail_size":
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or not MIN_THUMBNAIL_SIZE <= value <= MAX_THUMBNAIL_SIZE
            ):
                raise InvalidParameterError(
                    f"thumbnail_size must be an integer from {MIN_THUMBNAIL_SIZE} to {MAX_THUMBNAIL_SIZE}"
                )
        elif key == "thumbnail_format":
            if value not in THUMBNAIL_MEDIA_TYPES:
                raise InvalidParameterError(
                    f"thumbnail_format must be one of {', '.join(THUMBNAIL_MEDIA_TYPES)}"
                )
        else:
            raise InvalidParameterError(f"unknown source option {key!r}")
        resolved[key] = value
    return resolved


def check_sources(sources: Sequence[Source | None] | None, n: int) -> list[Source | None]:
    """One ``Source`` (or None) per document, within the limits; empty sources become None."""
    if sources is None:
        return [None] * n
    if isinstance(sources, (str, bytes)) or len(sources) != n:
        raise InvalidParameterError(f"got {n} ids but {len(sources)} sources")
    checked: list[Source | None] = []
    for i, source in enumerate(sources):
        if source is None or source.empty:
            checked.append(None)
            continue
        if not isinstance(source, Source):
            raise InvalidParameterError(f"source {i} is not a Source")
        if source.text is not None:
            if not isinstance(source.text, str):
                raise InvalidParameterError(f"source {i}: text must be a string")
            try:
                size = len(source.text.encode("utf-8"))
            except UnicodeEncodeError:
                raise InvalidParameterError(f"source {i}: text holds a lone UTF-16 surrogate") from None
            if "\x00" in source.text:  # PostgreSQL text cannot hold it: refused on both backends
                raise InvalidParameterError(f"source {i}: text holds a NUL character")
            if size > MAX_SOURCE_TEXT_BYTES:
                raise SourceTooLargeError(
                    f"document {i}: its text is {size} bytes, over the limit of {MAX_SOURCE_TEXT_BYTES} "
                    "bytes kept per document (create the collection with store_source false to keep none)"
                )
        if len(source.thumbnails) > MAX_THUMBNAILS_PER_DOCUMENT:
            raise SourceTooLargeError(
                f"document {i}: {len(source.thumbnails)} thumbnails, over the limit of "
                f"{MAX_THUMBNAILS_PER_DOCUMENT} per document"
            )
        total = 0
        for thumb in source.thumbnails:
            if not isinstance(thumb, Thumbnail) or thumb.media_type not in THUMBNAIL_MEDIA_TYPES.values():
                raise InvalidParameterError(f"source {i}: thumbnails must be WebP or JPEG Thumbnails")
            if thumb.seconds is not None and not (
                isinstance(thumb.seconds, float) and 0 <= thumb.seconds < 1e9
            ):
                raise InvalidParameterError(f"source {i}: a video's duration must be a number of seconds")
            total += len(thumb.data)
        if total > MAX_THUMBNAIL_BYTES_PER_DOCUMENT:
            raise SourceTooLargeError(
                f"document {i}: its thumbnails are {total} bytes, over the limit of "
                f"{MAX_THUMBNAIL_BYTES_PER_DOCUMENT} per document (use a smaller thumbnail_size)"
            )
        checked.append(source)
    return checked


# --- making sources from inputs ------------------------------------------------------------


def input_text(parsed_parts: Sequence[str | None]) -> str | None:
    """The text parts joined with newlines; NUL characters are dropped (PostgreSQL's text
    cannot hold them, and the text is for showing)."""
    texts = [part for part in parsed_parts if part is not None]
    return "\n".join(texts).replace("\x00", "") if texts else None


def make_thumbnail(image: Any, size: int, fmt: str, limits: Any = None) -> Thumbnail:
    """A thumbnail of one image payload (bytes, base64 text or a data: URI), checked against
    ``limits`` (``model.inputs.ImageLimits``) like the model's own decoding."""
    import numpy as np
    from PIL import Image, ImageOps

    from model.errors import ImageDecodeError
    from model.inputs import IMAGE_FORMATS, ImageLimits, image_bytes, image_size

    limits = limits or ImageLimits()
    raw = image_bytes(image, limits)
    image_size(raw, limits)  # pixel, bomb and aspect checks from the header, before decoding
    try:
        img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # decode at a reduced scale when it is still >= size
        img = ImageOps.exif_transpose(img)  # upright, as a viewer shows it
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # as the model's decoding
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
        img = img.convert("RGB")
        img.thumbnail((size, size), Image.Resampling.LANCZOS)  # keeps the aspect ratio, never enlarges
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError("image could not be decoded for its thumbnail (truncated or corrupt)") from exc
    return _encode_thumbnail(img, fmt)


def _encode_thumbnail(img: Any, fmt: str, seconds: float | None = None) -> Thumbnail:
    out = io.BytesIO()
    if fmt == "webp":
        img.save(out, "WEBP", quality=THUMBNAIL_QUALITY["webp"], method=4)
    else:
        img.save(out, "JPEG", quality=THUMBNAIL_QUALITY["jpeg"], optimize=True)
    return Thumbnail(THUMBNAIL_MEDIA_TYPES[fmt], out.getvalue(), seconds)


def media_limits(kw: Mapping[str, Any]) -> tuple[Any, Any]:
    """``model``'s (ImageLimits, VideoLimits) from ``service.limits.image_limits()``'s
    keyword arguments: a thumbnail is made only of an image or video the model accepts."""
    from model.inputs import ImageLimits
    from model.video import VideoLimits

    images = ImageLimits(
        max_pixels=kw["max_image_pixels"],
        max_images=kw["max_images_per_input"],
        max_bytes=kw["max_image_bytes"],
    )
    videos = VideoLimits(
        max_bytes=kw["max_video_bytes"],
        max_seconds=kw["max_video_seconds"],
        max_stream_frames=kw["max_video_stream_frames"],
        max_frame_pixels=kw["max_video_frame_pixels"],
        max_decoded_pixels=kw["max_video_decoded_pixels"],
    )
    return images, videos


def make_video_thumbnail(video: Any, size: int, fmt: str, limits: Any = None) -> Thumbnail:
    """A video's poster frame (its first frame, decoded within ``limits``, a
    ``model.video.VideoLimits``) as a thumbnail, with the video's duration."""
    from model.video import VideoLimits, poster_frame

    poster, info = poster_frame(video, limits or VideoLimits(), side=size)
    return _encode_thumbnail(poster.convert("RGB"), fmt, round(float(info.seconds), 3))


def source_of_input(
    inp: Mapping[str, Any], options: Mapping[str, Any], limits: Any = None, video_limits: Any = None
) -> Source:
    """The source kept for an input object (its images and videos already bytes or base64,
    not URLs): its text, and a thumbnail per image and per video, in order."""
    from model.inputs import ImageLimits, parse_input

    limits = limits or ImageLimits()
    parsed = parse_input(dict(inp), limits)
    size, fmt = options["thumbnail_size"], options["thumbnail_format"]
    thumbs = tuple(
        make_video_thumbnail(value, size, fmt, video_limits)
        if kind == "video"
        else make_thumbnail(value, size, fmt, limits)
        for kind, value in parsed.media
    )
    return Source(input_text(parsed.parts), thumbs)


INCLUDE_FIELDS = ("text", "thumbnail")  # what a search hit may carry besides id, score, metadata


def check_include(include: Any) -> tuple[str, ...]:
    if include is None:
        return ()
    if isinstance(include, str) or not all(isinstance(x, str) and x in INCLUDE_FIELDS for x in include):
        raise InvalidParameterError(f"include takes a list of {', '.join(INCLUDE_FIELDS)}")
    return tuple(dict.fromkeys(include))
