"""``POST /embed``: the native embedding endpoint."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from service.http.encodings import encode
from service.http.routes.common import (
    ERROR_RESPONSES,
    VectorJSONResponse,
    cancel_on_disconnect,
    check_input_count,
    get_engine,
    get_settings,
    served_name,
    timing_headers,
)
from service.http.schemas import EMBED_EXAMPLES, EmbedRequest, EmbedResponse

router = APIRouter(tags=["embeddings"])


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=ERROR_RESPONSES,
    summary="Embed texts, images and interleaved image+text",
)
async def embed(
    request: Request, body: Annotated[EmbedRequest, Body(openapi_examples=EMBED_EXAMPLES)]
) -> JSONResponse:
    """One vector per input, in order. ``normalize: false`` returns the pooled hidden state
    before L2 normalisation; ``truncate: false`` refuses over-long inputs (413) instead of
    cutting them as the authors do. ``encoding_format``: ``float`` (default), ``base64``,
    ``int8``, ``uint8``, ``binary``, ``ubinary``; ``embed_dtype``: ``float32``, ``float16``,
    ``bfloat16`` (``service/http/encodings.py`` has the scale rules). Timing headers: ``x-llave-preprocess-ms``,
    ``x-llave-queue-ms``, ``x-llave-inference-ms``."""
    settings = get_settings(request)
    engine = get_engine(request)
    check_input_count(settings, len(body.inputs))
    inputs = [inp.to_input() for inp in body.inputs]
    result = await cancel_on_disconnect(
        request, engine.embed(inputs, truncate=body.truncate, normalize=body.normalize)
    )
    content = {
        "embeddings": encode(result.embeddings, body.encoding_format, body.embed_dtype),
        "model": served_name(request),
        "dim": int(result.embeddings.shape[1]),
        "usage": result.usage,
    }
    return VectorJSONResponse(content, headers=timing_headers(result))
