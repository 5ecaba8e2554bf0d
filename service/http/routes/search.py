"""``POST /search``: nearest documents of a collection to a query (input or vector)."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from service import limits
from service.http.errors import PayloadTooLargeError
from service.http.routes.collections import RESPONSES, get_store
from service.http.routes.common import cancel_on_disconnect, get_engine, get_settings, timing_headers
from service.http.schemas import (
    SEARCH_EXAMPLES,
    HybridWeights,
    SearchRequest,
    SearchResponse,
    VectorQuery,
)
from service.storage.hybrid import hybrid_search
from service.storage.sources import Thumbnail

router = APIRouter(tags=["search"])


def data_uri(thumb: Thumbnail | None) -> str | None:
    if thumb is None:
        return None
    return f"data:{thumb.media_type};base64,{base64.b64encode(thumb.data).decode()}"


def check_response_size(hits: list[dict[str, Any]], limit: int) -> None:
    """413 when the hits' texts and thumbnails add up to more than ``limit`` bytes."""
    size = 0
    for hit in hits:
        for field in ("text", "thumbnail"):
            value = hit.get(field)
            if value:
                size += len(value.encode("utf-8")) if field == "text" else len(value)
    if size > limit:
        raise PayloadTooLargeError(
            f"the {len(hits)} hits' texts and thumbnails are {size} bytes, over the limit of {limit} "
            "per answer (--max-search-response-bytes); ask for fewer hits (k) or fewer include fields"
        )


@router.post("/search", response_model=SearchResponse, responses=RESPONSES, summary="Search a collection")
async def search(
    request: Request, body: Annotated[SearchRequest, Body(openapi_examples=SEARCH_EXAMPLES)]
) -> JSONResponse:
    """Best first, by cosine similarity; never more than ``k`` hits nor more than the
    collection holds, never a deleted or filtered-out document. ``filter``:
    ``{"field": value}`` is equality, ``{"field": [v1, v2]}`` any of the values.
    ``include``: ``["text", "thumbnail"]`` adds each hit's stored text and its first image's
    thumbnail (a ``data:`` URI), null where the document has none; when that is a video's
    first frame, ``video_seconds`` gives the video's duration. With ``include``, ``k``
    is at most ``max_k_with_sources`` and the texts and thumbnails of one answer at most
    ``max_search_response_bytes`` (both in ``/info``; 413 beyond either). ``query.mode``:
    ``vector`` (default), ``keyword`` (the stored texts holding the query's words) or
    ``hybrid`` (both rankings fused by reciprocal rank fusion, ``query.weights``).
    ``scanned_keys``: the filter's keys that no payload index serves (filtered by a scan of
    every document)."""
    store = get_store(request)
    if body.include and body.k > limits.MAX_K_WITH_SOURCES:
        raise PayloadTooLargeError(
            f"k is {body.k}; with include {body.include} a search returns at most "
            f"{limits.MAX_K_WITH_SOURCES} hits (ask without include for more ids and scores)"
        )
    headers: dict[str, str] = {}
    query: Any
    mode = getattr(body.query, "mode", "vector")
    if mode == "keyword":
        query = None
    elif isinstance(body.query, VectorQuery):
        query = body.query.vector  # the store reads it as float64 and refuses float32 overflow
    else:
        # Check the collection first: an unknown one should not cost a forward pass.
        await asyncio.to_thread(store.describe, body.collection)
        result = await cancel_on_disconnect(
            request,
            # normalised once, by the store (service.vectors.normalised_rows)
            get_engine(request).embed([body.query.to_input()], truncate=body.truncate, normalize=False),
        )
        query = result.embeddings[0]
        headers = timing_headers(result)
    hits: list[dict[str, Any]]
    if mode == "vector":
        hits = await asyncio.to_thread(
            store.search, body.collection, query, k=body.k, filter=body.filter, include=body.include
        )
    elif mode == "keyword":
        hits = await asyncio.to_thread(
            store.keyword_search, body.collection, body.query.text, body.k, body.filter, include=body.include
        )
    else:
        weights = body.query.weights or HybridWeights()
        hits = await asyncio.to_thread(
            hybrid_search, store, body.collection, query, body.query.text, body.k, body.filter,
            weights=(weights.vector, weights.keyword), include=tuple(body.include),
        )  # fmt: skip
    scanned = (
        (await asyncio.to_thread(store.search_plan, body.collection, body.filter))["scanned"]
        if body.filter
        else []
    )
    if "thumbnail" in body.include:
        for hit in hits:
            thumb = hit["thumbnail"]
            hit["thumbnail"] = data_uri(thumb)
            if thumb is not None and thumb.seconds is not None:
                hit["video_seconds"] = thumb.seconds  # the thumbnail is a video's first frame
    check_response_size(hits, get_settings(request).max_search_response_bytes)
    return JSONResponse(
        {"hits": hits, "collection": body.collection, "scanned_keys": scanned}, headers=headers
    )
