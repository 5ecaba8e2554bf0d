"""Output encodings of embeddings (``encoding_format`` and ``embed_dtype`` on ``/embed`` and
``/v1/embeddings``), named as Infinity, vLLM and Cohere name them.

- ``float``: JSON numbers (float32 values; with ``embed_dtype`` float16 or bfloat16, the
  values rounded to that type first).
- ``base64``: each vector's little-endian bytes in ``embed_dtype`` (float32 by default: what
  OpenAI's clients decode; float16, or bfloat16 as the top 16 bits of the float32, rounded to
  nearest even), base64-encoded.
- ``int8``: each vector scaled so that its largest absolute component is 127, rounded to
  the nearest integer: ``round(127 * v / max|v|)``. One scale per vector, not per batch
  (Infinity and sentence-transformers take per-dimension ranges from the batch itself, so the
  same input encodes differently in another batch, and a batch of one divides by zero).
  Cosine similarity does not depend on a vector's scale, so the integer vectors' cosine (or
  the dot product of unit-normalised ones) is the float vectors' up to rounding: at most
  0.5 / 127 per component, relative to the largest.
- ``uint8``: ``int8 + 128`` (0-255; 128 is zero).
- ``binary``: one bit per dimension, 1 where the component is > 0, packed 8 to a byte with
  the first dimension in the highest bit (``numpy.packbits``; the last byte padded with 0
  bits), each byte as a signed integer ``byte - 128``: sentence-transformers'
  ``quantize_embeddings(precision="binary")`` and Cohere's ``binary``. ``ceil(dim / 8)``
  numbers per vector. Hamming distance on the bits ranks like the angle.
- ``ubinary``: the same bytes as unsigned integers (0-255).

Every encoding applies to the vector the request asked for (L2-normalised unless
``normalize: false`` on ``/embed``).
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np

EncodingFormat = Literal["float", "base64", "int8", "uint8", "binary", "ubinary"]
EmbedDtype = Literal["float32", "float16", "bfloat16"]


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits of float32 values, rounded to nearest even."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded through ``dtype`` (as float32)."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return (_bfloat16_bits(x).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(x, np.float32)


def int8_codes(x: np.ndarray) -> np.ndarray:
    """(n, dim) int8: each row scaled to a largest absolute value of 127, rounded."""
    x = np.asarray(x, np.float64)
    peak = np.abs(x).max(axis=1, keepdims=True)
    scaled = np.divide(127.0 * x, peak, out=np.zeros_like(x), where=peak > 0)
    return np.clip(np.rint(scaled), -127, 127).astype(np.int8)


def sign_bits(x: np.ndarray) -> np.ndarray:
    """(n, ceil(dim / 8)) uint8: bit 1 where the component is > 0, first dimension highest."""
    return np.packbits(np.asarray(x) > 0, axis=1)


def encode(x: np.ndarray, encoding: str = "float", dtype: str = "float32") -> list[Any]:
    """One JSON value per row of ``x`` (n, dim) float32 in ``encoding`` (module docstring)."""
    if encoding == "float":
        return to_dtype(x, dtype).tolist()  # type: ignore[no-any-return]
    if encoding == "base64":
        if dtype == "bfloat16":
            rows = _bfloat16_bits(x).astype("<u2")
        else:
            rows = np.ascontiguousarray(x, "<f2" if dtype == "float16" else "<f4")
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    if encoding == "int8":
        return int8_codes(x).tolist()  # type: ignore[no-any-return]
    if encoding == "uint8":
        return (int8_codes(x).astype(np.int16) + 128).tolist()  # type: ignore[no-any-return]
    if encoding == "binary":
        return (sign_bits(x).astype(np.int16) - 128).tolist()  # type: ignore[no-any-return]
    if encoding == "ubinary":
        return sign_bits(x).tolist()  # type: ignore[no-any-return]
    raise ValueError(f"unknown encoding {encoding!r}")
