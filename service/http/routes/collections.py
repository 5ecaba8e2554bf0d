"""Collections of documents: upsert (embedding inputs through the shared batcher), get,
delete, list, describe, drop. The store (SQLite + FAISS) does the validation that
depends on stored state (dimensions, names, metadata); its errors map to 4xx in
``service/http/errors.py``. Store calls are blocking, so they run in the thread pool."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse

from service.http.errors import InvalidRequestError, UnavailableError
from service.http.routes.common import (
    ERROR_RESPONSES,
    cancel_on_disconnect,
    check_input_count,
    get_engine,
    get_settings,
)
from service.http.schemas import (
    UPSERT_EXAMPLES,
    CollectionInfo,
    CollectionList,
    CreateCollectionRequest,
    Deleted,
    DocumentOut,
    DocumentPage,
    IdsRequest,
    IdsResponse,
    UpsertRequest,
    UpsertResponse,
)
from service.storage.errors import DimensionMismatchError, DuplicateIdError

router = APIRouter(tags=["collections"])
RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    404: {"model": ERROR_RESPONSES[413]["model"], "description": "Unknown collection or document"},
    409: {"model": ERROR_RESPONSES[413]["model"], "description": "Conflicting collection options"},
}


def get_store(request: Request) -> Any:
    store = request.app.state.store
    if store is None:
        raise UnavailableError("the collection store is not open", retry_after_s=1)
    return store


async def _call(store: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(getattr(store, method), *args, **kwargs)


@router.put(
    "/collections/{name}",
    response_model=CollectionInfo,
    responses=RESPONSES,
    summary="Create a collection explicitly (index type and options)",
)
async def create_collection(request: Request, name: str, body: CreateCollectionRequest) -> dict[str, Any]:
    """Collections are also created on their first upsert (flat index, the upsert's
    dimension). Create one explicitly to choose an approximate index (``hnsw``/``ivf``).
    Repeating the same request is fine; different options give 409."""
    store = get_store(request)
    dim = body.dim
    if dim is None:
        engine = get_engine(request)
        if not engine.ready:
            raise InvalidRequestError("give 'dim': the model is not loaded yet")
        dim = engine.dim
    await _call(store, "create_collection", name, dim, index=body.index, options=body.options, exist_ok=True)
    return await _call(store, "describe", name)  # type: ignore[no-any-return]


@router.post(
    "/collections/{name}/documents",
    response_model=UpsertResponse,
    responses=RESPONSES,
    summary="Upsert documents (inputs to embed, or raw vectors), all or nothing",
)
async def upsert_documents(
    request: Request, name: str, body: Annotated[UpsertRequest, Body(openapi_examples=UPSERT_EXAMPLES)]
) -> JSONResponse:
    """Each document has an ``id``, optional ``metadata`` and either a ``vector`` or input
    fields (``text``, ``image``, ``instruction``, ``content``), embedded like ``/embed``.
    The whole request is stored in one transaction, or nothing is. An existing id is
    replaced. Vectors are L2-normalised; scores are cosine similarities."""
    settings = get_settings(request)
    store = get_store(request)
    docs = body.documents
    check_input_count(settings, len(docs))
    ids = [d.id for d in docs]
    seen: set[str] = set()
    for doc_id in ids:
        if doc_id in seen:
            raise DuplicateIdError(f"id {doc_id!r} appears more than once in this request")
        seen.add(doc_id)

    to_embed = [i for i, d in enumerate(docs) if d.vector is None]
    embedded = None
    if to_embed:
        engine = get_engine(request)
        result = await cancel_on_disconnect(
            request,
            engine.embed([docs[i].to_input() for i in to_embed], truncate=body.truncate, normalize=True),
        )
        embedded = result.embeddings
    dims = {len(d.vector) for d in docs if d.vector is not None}
    if embedded is not None:
        dims.add(int(embedded.shape[1]))
    if len(dims) > 1:
        raise DimensionMismatchError(f"documents in one request have different dimensions: {sorted(dims)}")
    dim = dims.pop()
    vectors = np.empty((len(docs), dim), dtype=np.float32)
    for row, d in enumerate(docs):
        if d.vector is not None:
            # float64 first: an overflowing value becomes inf, which the store refuses
            vectors[row] = np.asarray(d.vector, dtype=np.float64)
    if embedded is not None:
        vectors[to_embed] = embedded
    stored = await _call(store, "upsert", name, ids, vectors, [d.metadata for d in docs])
    info = await _call(store, "describe", name)
    return JSONResponse({"collection": name, "ids": list(stored), "count": info["count"]})


@router.get(
    "/collections", response_model=CollectionList, responses=ERROR_RESPONSES, summary="List collections"
)
async def list_collections(request: Request) -> dict[str, Any]:
    return {"collections": await _call(get_store(request), "list_collections")}


@router.get(
    "/collections/{name}", response_model=CollectionInfo, responses=RESPONSES, summary="Describe a collection"
)
async def describe_collection(request: Request, name: str) -> dict[str, Any]:
    return await _call(get_store(request), "describe", name)  # type: ignore[no-any-return]


@router.delete(
    "/collections/{name}",
    response_model=Deleted,
    responses=RESPONSES,
    summary="Delete a collection and its documents",
)
async def delete_collection(request: Request, name: str) -> dict[str, str]:
    await _call(get_store(request), "delete_collection", name)
    return {"deleted": name}


@router.get(
    "/collections/{name}/documents",
    response_model=DocumentPage,
    responses=RESPONSES,
    summary="Page through a collection's documents in id order",
)
async def list_documents(
    request: Request,
    name: str,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    with_vector: Annotated[bool, Query()] = False,
) -> dict[str, Any]:
    docs, next_cursor = await _call(
        get_store(request), "list_documents", name, cursor or None, limit, with_vector=with_vector
    )
    for doc in docs:
        if with_vector:
            doc["vector"] = np.asarray(doc["vector"], dtype=np.float32).tolist()
    return {"documents": docs, "next_cursor": next_cursor}


@router.get(
    "/collections/{name}/documents/{doc_id:path}",
    response_model=DocumentOut,
    responses=RESPONSES,
    summary="Get one document",
)
async def get_document(
    request: Request, name: str, doc_id: str, with_vector: Annotated[bool, Query()] = False
) -> dict[str, Any]:
    doc = await _call(get_store(request), "get", name, doc_id, with_vector=with_vector)
    if with_vector and doc.get("vector") is not None:
        doc["vector"] = np.asarray(doc["vector"], dtype=np.float32).tolist()
    return doc  # type: ignore[no-any-return]


@router.delete(
    "/collections/{name}/documents/{doc_id:path}",
    response_model=Deleted,
    responses=RESPONSES,
    summary="Delete one document (gone from search at once)",
)
async def delete_document(request: Request, name: str, doc_id: str) -> dict[str, str]:
    await _call(get_store(request), "delete", name, doc_id)
    return {"deleted": doc_id}


@router.post(
    "/collections/{name}/existing",
    response_model=IdsResponse,
    responses=RESPONSES,
    summary="Which of these ids are stored (for resumable ingestion)",
)
async def existing_ids(request: Request, name: str, body: IdsRequest) -> dict[str, list[str]]:
    found = await _call(get_store(request), "existing_ids", name, body.ids)
    return {"existing": [i for i in body.ids if i in found]}
