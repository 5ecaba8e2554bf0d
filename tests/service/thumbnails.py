"""Checks of stored thumbnails against the images they were made from, decoded with Pillow
(independently of the code that wrote them)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

# Mean colour per channel: resampling and lossy WebP/JPEG move it a little, never this far.
MEAN_COLOUR_TOL = 0.03 * 255


def expected_size(original: bytes, size: int) -> tuple[int, int]:
    """(width, height) of a thumbnail whose longest side is ``size``, never enlarged, upright."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(original)))
    w, h = img.size
    scale = min(1.0, size / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def assert_thumbnail_of(thumbnail: bytes, original: bytes, size: int, fmt: str = "WEBP") -> Image.Image:
    """The thumbnail decodes as ``fmt``, RGB, of the expected size (within a pixel of rounding)
    and the original's mean colour (upright, RGB) within ``MEAN_COLOUR_TOL``."""
    thumb = Image.open(io.BytesIO(thumbnail))
    assert thumb.format == fmt, thumb.format
    assert thumb.mode == "RGB", thumb.mode
    want_w, want_h = expected_size(original, size)
    assert abs(thumb.width - want_w) <= 1 and abs(thumb.height - want_h) <= 1, (thumb.size, (want_w, want_h))
    assert max(thumb.size) <= size
    source = ImageOps.exif_transpose(Image.open(io.BytesIO(original))).convert("RGB")
    got = np.asarray(thumb.convert("RGB"), np.float64).reshape(-1, 3).mean(axis=0)
    want = np.asarray(source, np.float64).reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(got, want, atol=MEAN_COLOUR_TOL)
    return thumb


def image_with_corner(width: int, height: int, colour=(40, 160, 220), fmt: str = "PNG", **save) -> bytes:
    """A solid image with a dark top-left quarter-ish block (so the mean is not the colour and
    orientation shows)."""
    img = Image.new("RGB", (width, height), colour)
    img.paste((10, 10, 10), (0, 0, max(1, width // 3), max(1, height // 3)))
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def rotated_jpeg(width: int, height: int, orientation: int = 6) -> bytes:
    """A JPEG stored ``width`` x ``height`` whose EXIF says to rotate it for display."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_with_corner(width, height, fmt="JPEG", quality=95, exif=exif)
