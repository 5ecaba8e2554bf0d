"""Collections of documents: upsert (embedding inputs through the shared batcher), get,
thumbnails, delete, list, describe, drop. The store does the validation that depends on
stored state (dimensions, names, metadata); its errors map to 4xx in
``service/http/errors.py``. Store calls are blocking, so they run in the thread pool.

An upsert takes the one path every writer takes (``service/storage/documents.py``): ids
checked for repeats before any embedding is paid for, raw and embedded vectors assembled
in document order, normalised once, by the store. Where the collection keeps sources, the
documents' text and image thumbnails (``service/storage/sources.py``) are made in a worker
thread while the engine embeds, and stored in the same transaction as the vectors."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.convertors import PathConvertor, register_url_convertor

from service import limits
from service.http.errors import InvalidRequestError, PayloadTooLargeError, UnavailableError
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
    DocumentDetail,
    DocumentPage,
    IdsRequest,
    IdsResponse,
    UpsertRequest,
    UpsertResponse,
)
from service.storage.documents import assemble_vectors, check_unique_ids
from service.storage.errors import CollectionNotFoundError
from service.storage.sources import (
    MAX_THUMBNAILS_PER_DOCUMENT,
    SOURCE_DEFAULTS,
    Source,
    Thumbnail,
    media_limits,
    source_of_input,
)


class DocIdConvertor(PathConvertor):
    """A document id in a path: like ``path`` (ids may hold ``/``), but never ending in a
    literal ``/thumbnail`` segment, which is the thumbnail route's; so each path has one
    route, and a 405's ``Allow`` names only what that path serves."""

    regex = r".*(?<!/thumbnail)"


register_url_convertor("docid", DocIdConvertor())

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


def image_limits(request: Request) -> tuple[Any, Any]:
    """The image and video limits in force (``service/limits.py``): a thumbnail is made only
    of an image or a video the model accepts."""
    return media_limits(limits.image_limits(get_settings(request)))


@router.put(
    "/collections/{name}",
    response_model=CollectionInfo,
    responses=RESPONSES,
    summary="Create a collection explicitly (index type and options, source options)",
)
async def create_collection(request: Request, name: str, body: CreateCollectionRequest) -> dict[str, Any]:
    """Collections are also created on their first upsert (flat index, the upsert's
    dimension, the default source options). Create one explicitly to choose an approximate
    index (``hnsw``/``ivf``), the source options (``store_source``, ``thumbnail_size``,
    ``thumbnail_format``) or payload ``indexes`` (the metadata keys filters use; changeable,
    built in the background: ``indexing`` lists those not ready yet). Repeating the same request is fine; different index options give
    409. Source options given for an existing collection change it (for documents stored from
    then on)."""
    store = get_store(request)
    dim = body.dim
    if dim is None:
        try:  # an existing collection: its own dimension (changing only source options)
            dim = (await _call(store, "describe", name))["dim"]
        except CollectionNotFoundError:
            engine = get_engine(request)
            if not engine.ready:
                raise InvalidRequestError("give 'dim': the model is not loaded yet") from None
            dim = engine.dim
    return await _call(  # type: ignore[no-any-return]
        store,
        "create_collection",
        name,
        dim,
        index=body.index,
        options=body.options,
        exist_ok=True,
        source=body.source_options() or None,
        indexes=body.indexes,
    )


async def _source_options(store: Any, name: str) -> dict[str, Any]:
    """The collection's source options; the defaults for one the upsert will create."""
    try:
        return await _call(store, "source_options", name)  # type: ignore[no-any-return]
    except CollectionNotFoundError:
        return dict(SOURCE_DEFAULTS)


def _make_sources(
    inputs: dict[int, dict[str, Any]], options: dict[str, Any], limits: tuple[Any, Any]
) -> dict[int, Source]:
    sources = {}
    for row, inp in inputs.items():
        try:
            sources[row] = source_of_input(inp, options, *limits)
        except Exception as exc:
            exc.input_index = row  # type: ignore[attr-defined]  (the error names the document)
            raise
    return sources


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
    fields (``text``, ``image``, ``video``, ``instruction``, ``content``), embedded like ``/embed``.
    The whole request is stored in one transaction, or nothing is. An existing id is
    replaced (with its source). Vectors are L2-normalised; scores are cosine similarities.
    When the collection keeps sources (``store_source``, the default), an input document's
    text and a thumbnail of each image (of a video: its first frame, with its duration) are
    stored with it; raw-vector documents have none."""
    store = get_store(request)
    docs = body.documents
    settings = get_settings(request)
    check_input_count(settings, sum(1 for d in docs if d.vector is None))
    vectors_given = sum(1 for d in docs if d.vector is not None)
    if vectors_given > settings.max_vector_documents_per_request:
        raise PayloadTooLargeError(
            f"{vectors_given} documents with a vector in one request; the limit is "
            f"{settings.max_vector_documents_per_request}"
        )
    ids = check_unique_ids([d.id for d in docs])  # before any embedding is paid for

    inputs = {row: d.to_input() for row, d in enumerate(docs) if d.vector is None}
    embedded = None
    sources: dict[int, Source] = {}
    if inputs:
        engine = get_engine(request)
        options = await _source_options(store, name)
        thumbnails = None
        if options["store_source"]:
            fetcher = getattr(engine, "images", None)
            if fetcher is not None:  # fetch allow-listed image URLs once, for the model and thumbnails
                inputs = dict(zip(inputs, await fetcher.resolve_inputs(list(inputs.values())), strict=True))
            thumbnails = asyncio.ensure_future(
                asyncio.to_thread(_make_sources, inputs, options, image_limits(request))
            )
        try:
            result = await cancel_on_disconnect(
                request, engine.embed(list(inputs.values()), truncate=body.truncate, normalize=False)
            )
        except BaseException:
            if thumbnails is not None:
                thumbnails.cancel()
            raise
        embedded = result.embeddings
        if thumbnails is not None:
            sources = await thumbnails
    vectors = assemble_vectors([d.vector for d in docs], embedded, list(inputs))
    stored = await _call(
        store,
        "upsert",
        name,
        ids,
        vectors,
        [d.metadata for d in docs],
        sources=[sources.get(row) for row in range(len(docs))],
    )
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
    limit: Annotated[int, Query(ge=1, le=limits.MAX_PAGE_SIZE)] = 100,
    with_vector: Annotated[bool, Query()] = False,
) -> dict[str, Any]:
    docs, next_cursor = await _call(
        get_store(request), "list_documents", name, cursor or None, limit, with_vector=with_vector
    )
    for doc in docs:
        if with_vector:
            doc["vector"] = np.asarray(doc["vector"], dtype=np.float32).tolist()
    return {"documents": docs, "next_cursor": next_cursor}


def _etag_matches(header: str, etag: str) -> bool:
    """If-None-Match: ``*`` or a list of (possibly weak) entity tags."""
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in tags or etag in tags


def thumbnail_response(request: Request, thumb: Thumbnail) -> Response:
    headers = {
        "ETag": thumb.etag,
        # private: the API key may protect it; no-cache: revalidate (a replaced document
        # gets a new thumbnail at the same URL), answered 304 while it is unchanged
        "Cache-Control": "private, no-cache",
        "X-Content-Type-Options": "nosniff",
    }
    match = request.headers.get("if-none-match")
    if match is not None and _etag_matches(match, thumb.etag):
        return Response(status_code=304, headers=headers)
    return Response(thumb.data, media_type=thumb.media_type, headers=headers)


@router.get(
    "/collections/{name}/documents/{doc_id:path}/thumbnail",
    response_class=Response,
    responses={
        200: {"content": {"image/webp": {}, "image/jpeg": {}}, "description": "The thumbnail"},
        304: {"description": "Not modified (If-None-Match matched the ETag)"},
        **RESPONSES,
    },
    summary="A document's thumbnail (WebP or JPEG)",
)
async def get_thumbnail(
    request: Request,
    name: str,
    doc_id: str,
    index: Annotated[int, Query(ge=0, lt=MAX_THUMBNAILS_PER_DOCUMENT, description="Which image")] = 0,
) -> Response:
    """The thumbnail of the document's ``index``-th image, with an ``ETag`` (``If-None-Match``
    gives 304) and ``Cache-Control: private``. 404 when the document or that thumbnail does
    not exist.

    Ids may contain ``/`` but never end in ``/thumbnail`` (the store refuses such ids), so
    this path names exactly one thing.
    """
    thumb = await _call(get_store(request), "thumbnail", name, doc_id, index)
    return thumbnail_response(request, thumb)


@router.get(
    "/collections/{name}/documents/{doc_id:docid}",
    response_model=DocumentDetail,
    responses=RESPONSES,
    summary="Get one document (with its source's text and how many thumbnails it has)",
)
async def get_document(
    request: Request, name: str, doc_id: str, with_vector: Annotated[bool, Query()] = False
) -> dict[str, Any]:
    """``text``: the input's text parts joined with newlines (null when it had none, or the
    collection keeps no sources); ``thumbnails``: how many images have a thumbnail
    (``.../thumbnail?index=i``)."""
    doc = await _call(get_store(request), "get", name, doc_id, with_vector=with_vector)
    if with_vector and doc.get("vector") is not None:
        doc["vector"] = np.asarray(doc["vector"], dtype=np.float32).tolist()
    return doc  # type: ignore[no-any-return]


@router.delete(
    "/collections/{name}/documents/{doc_id:docid}",
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
