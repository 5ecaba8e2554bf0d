"""Helpers shared by the route modules: app state access, limits, disconnects, headers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse

from service.http.errors import ClientClosedRequestError, PayloadTooLargeError
from service.http.schemas import ErrorResponse
from service.inference.client import EmbedResult, EngineClient
from service.settings import Settings

T = TypeVar("T")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Malformed JSON",
        401: "Missing or wrong API key (when one is configured)",
        413: "Body, inputs, images, pixels or tokens over a limit",
        415: "Body is not JSON",
        422: "Invalid request or input (types, unknown fields, empty input, bad image)",
        429: "Queue full; retry after Retry-After seconds",
        503: "Model not ready, request timed out, or worker down",
    }.items()
}


class VectorJSONResponse(JSONResponse):
    """A JSON response rendered by orjson, for bodies made mostly of float vectors.

    Encoding floats is most of the work of rendering such a body, and with the stdlib
    encoder it is a large share of a small request's CPU on the event loop; orjson does it
    many times faster (measured: bench/README.md, ``bench/json_encode.py``) and writes the
    same shortest round-trip digits (small exponents as ``0.00001``, not
    ``1e-05``). Content must be plain JSON types with finite floats (the engine refuses
    non-finite embeddings before they get here).
    """

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def served_name(request: Request) -> str:
    """``settings.model_name``, worked out once per app: it parses the model's path, which
    cost a measurable share of a small request (bench/README.md, "Profile of one request")."""
    state = request.app.state
    settings = state.settings
    cached = getattr(state, "served_name", None)
    if cached is None or cached[0] is not settings:
        cached = state.served_name = (settings, settings.model_name)
    return cached[1]  # type: ignore[no-any-return]


def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine  # type: ignore[no-any-return]


def check_input_count(settings: Settings, n: int) -> None:
    if n > settings.max_inputs_per_request:
        raise PayloadTooLargeError(
            f"{n} inputs in one request; the limit is {settings.max_inputs_per_request}"
        )


def timing_headers(result: EmbedResult) -> dict[str, str]:
    """``x-llave-<stage>-ms`` headers: preprocess, queue and inference time of this request."""
    return {
        f"x-llave-{name.removesuffix('_ms')}-ms": f"{value:.3f}" for name, value in result.timings.items()
    }


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first.

    Cancelling the engine's ``embed`` drops the request's inputs that have not reached the
    device, so a client that gave up costs no forward pass. Call it after the body is read.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientClosedRequestError("the client closed the connection before the answer was ready")
