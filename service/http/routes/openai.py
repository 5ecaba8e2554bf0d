"""OpenAI-compatible ``POST /v1/embeddings`` and ``GET /v1/models``."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from service.http.encodings import encode
from service.http.errors import InvalidRequestError, NotFoundError
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
from service.http.schemas import (
    OPENAI_EXAMPLES,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    OpenAIModelList,
)

router = APIRouter(prefix="/v1", tags=["openai"])

_STARTED = int(time.time())


@router.post(
    "/embeddings",
    response_model=OpenAIEmbeddingResponse,
    responses={**ERROR_RESPONSES, 404: ERROR_RESPONSES[422] | {"description": "Unknown model"}},
    summary="OpenAI-compatible embeddings (always L2-normalised)",
)
async def create_embeddings(
    request: Request, body: Annotated[OpenAIEmbeddingRequest, Body(openapi_examples=OPENAI_EXAMPLES)]
) -> JSONResponse:
    """``input`` is a string, a list of strings or a list of input objects; or, instead,
    vLLM's chat form ``messages``: one user message whose ``content`` is a string or a list
    of ``text`` and ``image_url`` parts, embedded exactly as the interleaved ``content`` input
    with the same parts (one vector). Token ids are refused: they come from another
    tokenizer. ``model`` is optional (when given it must name the served model);
    ``encoding_format: base64`` returns each vector as base64 of its little-endian float32
    bytes (``embed_dtype`` float16/bfloat16: those bytes); ``int8``, ``uint8``, ``binary``,
    ``ubinary`` as Infinity and Cohere name them (``service/http/encodings.py``)."""
    settings = get_settings(request)
    engine = get_engine(request)
    if body.model is not None and not engine.accepts_model_name(body.model):
        raise NotFoundError(
            f"model {body.model!r} is not served here; this server serves {settings.model_name!r}"
        )
    inputs = body.to_inputs()
    if not inputs:
        raise InvalidRequestError("input: give at least one input")
    check_input_count(settings, len(inputs))
    engine.check_ready()
    if body.dimensions is not None and body.dimensions != engine.dim:
        raise InvalidRequestError(f"dimensions: this model only produces {engine.dim}-dimensional vectors")
    result = await cancel_on_disconnect(request, engine.embed(inputs, truncate=True, normalize=True))
    vectors = encode(result.embeddings, body.encoding_format, body.embed_dtype)
    content = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)
        ],
        "model": served_name(request),
        "usage": {
            "prompt_tokens": result.usage["prompt_tokens"],
            "total_tokens": result.usage["total_tokens"],
        },
    }
    return VectorJSONResponse(content, headers=timing_headers(result))


@router.get("/models", response_model=OpenAIModelList, summary="The one served model (OpenAI shape)")
async def list_models(request: Request) -> dict[str, Any]:
    settings = get_settings(request)
    return {
        "object": "list",
        "data": [
            {"id": settings.model_name, "object": "model", "created": _STARTED, "owned_by": "llave-server"}
        ],
    }
