"""One upsert path: what every writer (the HTTP route, ``service.ingest``, ``service.migrate``)
does to a batch of documents before the store sees it.

- ``check_unique_ids``: no id twice in one batch (checked before any embedding is paid for;
  the store's ``check_upsert_batch`` uses the same function);
- ``assemble_vectors``: the batch's vectors in document order, raw ``vector`` documents mixed
  with embedded ones; every vector of the batch has one dimension, and raw values are read
  as float64 and then stored as float32, so a value beyond float32's range is refused
  rather than stored as infinity.

Normalisation is not done here: the store normalises every stored vector with
``service.vectors.normalised_rows``, the service's one normalisation function,
so callers hand it vectors as they are (the engine's ``normalize=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.storage.errors import DimensionMismatchError, InvalidVectorError
from service.storage.validation import check_unique_ids, shown  # noqa: F401  (re-exported)


def assemble_vectors(
    raw: Sequence[Sequence[float] | None], embedded: Any = None, embedded_rows: Sequence[int] = ()
) -> np.ndarray:
    """(n, dim) float32: row i is ``raw[i]`` when given, else the next row of ``embedded``
    (``embedded_rows`` lists, in order, the rows that ``embedded`` fills)."""
    n = len(raw)
    embedded_rows = list(embedded_rows)
    to_embed = set(embedded_rows)
    if embedded is not None:
        embedded = np.asarray(embedded)
        if embedded.ndim != 2 or embedded.shape[0] != len(embedded_rows):
            raise InvalidVectorError(
                f"{len(embedded_rows)} documents to embed but {embedded.shape[0]} embeddings"
            )
    elif embedded_rows:
        raise InvalidVectorError(f"{len(embedded_rows)} documents to embed but no embeddings")
    dims: set[int] = set()
    for i, vector in enumerate(raw):
        if vector is not None:
            if i in to_embed:
                raise InvalidVectorError(f"document {i} has both a vector and an embedding")
            try:
                dims.add(len(vector))
            except TypeError:
                raise InvalidVectorError(f"document {i}: a vector must be a list of numbers") from None
        elif i not in to_embed:
            raise InvalidVectorError(f"document {i} has neither a vector nor input to embed")
    if embedded is not None:
        dims.add(int(embedded.shape[1]))
    if len(dims) > 1:
        raise DimensionMismatchError(f"documents in one request have different dimensions: {sorted(dims)}")
    if not dims:
        return np.empty((n, 0), np.float32)
    dim = dims.pop()
    vectors = np.empty((n, dim), dtype=np.float32)
    given = [i for i, vector in enumerate(raw) if vector is not None]
    if given:
        try:
            wide = np.array([raw[i] for i in given], dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidVectorError("vectors must be lists of numbers") from None
        with np.errstate(over="ignore", invalid="ignore"):
            narrow = wide.astype(np.float32)
        bad = ~np.isfinite(narrow).all(axis=1)
        if bad.any():
            first = given[int(np.flatnonzero(bad)[0])]
            raise InvalidVectorError(
                f"document {first}: its vector holds NaN, infinite or values beyond float32's range"
            )
        vectors[given] = narrow
    if embedded is not None and embedded_rows:
        vectors[embedded_rows] = embedded
    return vectors
