"""``POST /search``: nearest documents of a collection to a query (input or vector)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from service.http.routes.collections import RESPONSES, get_store
from service.http.routes.common import cancel_on_disconnect, get_engine, timing_headers
from service.http.schemas import SEARCH_EXAMPLES, SearchRequest, SearchResponse, VectorQuery

router = APIRouter(tags=["search"])


@router.post("/search", response_model=SearchResponse, responses=RESPONSES, summary="Search a collection")
async def search(
    request: Request, body: Annotated[SearchRequest, Body(openapi_examples=SEARCH_EXAMPLES)]
) -> JSONResponse:
    """Best first, by cosine similarity; never more than ``k`` hits nor more than the
    collection holds, never a deleted or filtered-out document. ``filter``:
    ``{"field": value}`` is equality, ``{"field": [v1, v2]}`` any of the values."""
    store = get_store(request)
    headers: dict[str, str] = {}
    if isinstance(body.query, VectorQuery):
        query = np.asarray(body.query.vector, dtype=np.float64).astype(np.float32)
    else:
        # Check the collection first: an unknown one should not cost a forward pass.
        await asyncio.to_thread(store.describe, body.collection)
        result = await cancel_on_disconnect(
            request,
            get_engine(request).embed([body.query.to_input()], truncate=body.truncate, normalize=True),
        )
        query = result.embeddings[0]
        headers = timing_headers(result)
    hits: list[dict[str, Any]] = await asyncio.to_thread(
        store.search, body.collection, query, k=body.k, filter=body.filter
    )
    return JSONResponse({"hits": hits, "collection": body.collection}, headers=headers)
