"""How the embedded store answers a filtered search: a plan chosen from the filter's size.

With ``m`` of the collection's ``n`` documents matching (counted from the payload index:
the smallest count of one clause's entries, an upper bound when clauses combine; or from
the scan that evaluated the filter):

- ``exact``: when the matches hold at most ``EXACT_SCAN_BUDGET`` vector components, the
  matching rows are scored exactly (a FAISS scan that skips the others through a bitmap);
  cost proportional to ``m``, recall 1 (a binary index: up to ``BINARY_EXACT_RESCORE``
  matches all go to the exact rescoring from float32; of more, the nearest that many by
  Hamming distance).
- ``postfilter``: otherwise the approximate index proposes the ``POSTFILTER_OVERSAMPLE *
  k * n / m`` best documents of the whole collection (the beam widened to match) and the
  filter checks them (a lookup of those row ids, not of every match); when at least ``k``
  pass, they are the filtered top ``k`` up to the index's own recall. Cost proportional to
  ``k / selectivity``: the plan for filters that keep much of the collection.
- ``graph``: when the checked candidates come up short (a filter that avoids the query's
  neighbourhood) or too many would be needed, the HNSW walk runs with the filter as a
  FAISS selector and its beam ``ef_search`` grown by ``n / m`` (capped at
  ``MAX_EF_SEARCH``): skipped nodes no longer starve it, as they did with a fixed beam.

Qdrant plans filtered searches the same way (payload index cardinality -> exact scan or
filtered HNSW); pgvector's counterpart is in ``postgres_filters.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from service.limits import (
    BINARY_EXACT_RESCORE,
    EXACT_SCAN_BUDGET,
    MAX_EF_SEARCH,
    POSTFILTER_MAX_CANDIDATES,
    POSTFILTER_OVERSAMPLE,
)
from service.storage.vector_index import ApproximateIndex, SearchResult, VectorIndex


def _empty(nq: int) -> SearchResult:
    return np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64)


def search_filtered(
    index: VectorIndex,
    queries: np.ndarray,
    k: int,
    count: Callable[[], int],
    allowed: Callable[[], np.ndarray],
    members: Callable[[np.ndarray], np.ndarray],
) -> tuple[SearchResult, str]:
    """((scores, labels), plan name) of the ``k`` best documents that pass the filter.

    ``count()``: how many documents match (or an upper bound); ``allowed()``: their labels; ``members(labels)``:
    a boolean mask of which of these labels match. Each is called only if the plan needs it.
    """
    if not isinstance(index, ApproximateIndex) or index.mode == "exact":
        return index.search(queries, k, allowed()), "exact"
    m, n = count(), len(index)
    if m == 0:
        return _empty(len(queries)), "exact"
    if m * index.dim <= EXACT_SCAN_BUDGET:
        if index.binary and index.reduced:  # sign bits rank coarsely: more matches get exact scores
            if m <= BINARY_EXACT_RESCORE:  # all of them, with no Hamming scan
                labels = np.tile(allowed(), (len(queries), 1))
                return (np.zeros(labels.shape, np.float32), labels), "exact"
            k = max(k, BINARY_EXACT_RESCORE)
        return index.search(queries, k, allowed(), exact=True), "exact"
    ef = int(index.options.get("ef_search") or 0)
    want = math.ceil(POSTFILTER_OVERSAMPLE * k * n / m)
    if want <= POSTFILTER_MAX_CANDIDATES:
        found = _postfilter(index, queries, min(k, m), want, max(ef, want), members)
        if found is not None:
            return found, "postfilter"
    beam = min(MAX_EF_SEARCH, max(ef, math.ceil(ef * n / m)))
    return index.search(queries, k, allowed(), ef_search=beam), "graph"


def _postfilter(
    index: ApproximateIndex,
    queries: np.ndarray,
    k: int,
    want: int,
    beam: int,
    members: Callable[[np.ndarray], np.ndarray],
) -> SearchResult | None:
    scores, labels = index.search(queries, want, ef_search=beam)
    passed = (labels >= 0) & members(labels)
    if (passed.sum(axis=1) < k).any():
        return None
    out_scores = np.empty((len(queries), k), np.float32)
    out_labels = np.empty((len(queries), k), np.int64)
    for i in range(len(queries)):
        rows = np.flatnonzero(passed[i])[:k]  # the index returns its candidates best first
        out_scores[i], out_labels[i] = scores[i, rows], labels[i, rows]
    return out_scores, out_labels
