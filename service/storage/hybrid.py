"""Keyword and hybrid search over the documents' stored text, for both backends.

Keyword search ranks the documents whose source text contains any of the query's words:
SQLite FTS5 with BM25 (embedded), PostgreSQL full-text search with a GIN index and
``ts_rank_cd`` (``simple`` configuration: no stemming, so part numbers and names stay
whole). Hybrid search runs the vector search and the keyword search, each for
``HYBRID_CANDIDATES`` hits (at least ``k``), and fuses the two rankings by reciprocal rank
fusion: ``score = w_vector / (RRF_K + rank_vector) + w_keyword / (RRF_K + rank_keyword)``
(ranks from 1; a document missing from one list gets nothing from it). Filters apply to
both lists. A document without stored text can only come from the vector side.
"""

from __future__ import annotations

import re
from typing import Any

from service.limits import HYBRID_CANDIDATES, MAX_K, MAX_QUERY_WORDS, RRF_K
from service.storage.errors import InvalidParameterError

_WORD = re.compile(r"\w+")


def query_words(text: Any) -> list[str]:
    """The words of a keyword query, lower-cased, each once, in order (at most
    ``MAX_QUERY_WORDS``); a query that is not a string is refused."""
    if not isinstance(text, str):
        raise InvalidParameterError("a keyword query is a string")
    seen: dict[str, None] = {}
    for word in _WORD.findall(text.lower()):
        seen.setdefault(word, None)
    return list(seen)[:MAX_QUERY_WORDS]


def fts5_query(words: list[str]) -> str:
    """An FTS5 MATCH expression: any of the words, each a quoted string (no operators)."""
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in words)


def rrf(rankings: list[tuple[float, list[dict[str, Any]]]], k: int) -> list[dict[str, Any]]:
    """Reciprocal rank fusion of ``(weight, hits best first)`` lists: the ``k`` best hits by
    fused score (ties: the better rank in the first list, then id), each with ``"score"``
    (fused) and its per-list scores under ``"vector_score"``/``"keyword_score"``."""
    fused: dict[str, dict[str, Any]] = {}
    for (weight, hits), field in zip(rankings, ("vector_score", "keyword_score"), strict=False):
        for rank, hit in enumerate(hits, start=1):
            entry = fused.setdefault(
                hit["id"], {**hit, "score": 0.0, "vector_score": None, "keyword_score": None}
            )
            entry["score"] += weight / (RRF_K + rank)
            entry[field] = hit["score"]
    return sorted(fused.values(), key=lambda h: (-h["score"], h["id"]))[:k]


def hybrid_search(
    store: Any,
    name: str,
    vector: Any,
    text: str,
    k: int,
    filter: dict[str, Any] | None = None,
    *,
    weights: tuple[float, float] = (1.0, 1.0),
    include: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The fused top ``k`` of the vector search for ``vector`` and the keyword search for ``text``."""
    depth = min(max(k, HYBRID_CANDIDATES), MAX_K)
    by_vector = store.search(name, vector, depth, filter, include=include)
    by_words = store.keyword_search(name, text, depth, filter, include=include)
    return rrf([(weights[0], by_vector), (weights[1], by_words)], k)
