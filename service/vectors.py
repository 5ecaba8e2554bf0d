"""Unit-length vectors: the one normalisation of the service.

Stored vectors, search queries and ``/embed``'s answers are all normalised by
``normalised_rows`` (in float64, returned as float32), so every path scales a vector the
same way and refuses the same bad ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.storage.errors import InvalidVectorError


def normalised_rows(vectors: Any, *, what: str = "vector") -> np.ndarray:
    """(n, dim) float32 rows scaled to unit L2 norm; InvalidVectorError for NaN/inf/zero rows."""
    try:
        with np.errstate(over="ignore"):
            arr = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidVectorError(f"{what}s must be numeric arrays of equal length") from exc
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InvalidVectorError(f"{what}s must form a non-empty 2-D array, got shape {arr.shape}")
    with np.errstate(over="ignore"):
        arr = arr.astype(np.float32).astype(np.float64)  # values beyond float32's range become inf
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise InvalidVectorError(f"{what} {int(np.flatnonzero(bad)[0])} holds NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1)
    if (norms == 0).any():
        raise InvalidVectorError(f"{what} {int(np.flatnonzero(norms == 0)[0])} is all zeros")
    return np.ascontiguousarray(arr / norms[:, None], dtype=np.float32)
