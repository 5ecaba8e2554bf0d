"""Every error the service answers with, mapped to an HTTP status in this one place.

Domain code raises typed errors and knows nothing about HTTP:

- the model core raises ``model.errors.LlaveError`` subclasses (bad inputs, images...);
  the engine turns them into ``ModelInputError`` with ``from_model_error`` (matched by
  class name, so that importing the service does not import the model core, and with it
  torch: that import is part of loading the model, which happens in the background),
- the collection store raises ``service.storage.errors.StoreError`` subclasses,
- the service itself raises ``ApiError`` subclasses below (overload, limits, auth...).

``install_error_handlers(app)`` turns each into ``{"error": {"type": ..., "message": ...}}``
with the status from the tables below. Anything else is a bug: a 500 with a generic body
and the traceback in the log, never in the response.

| error                                      | status | type                      |
|--------------------------------------------|--------|---------------------------|
| malformed JSON body                        | 400    | invalid_json              |
| missing/wrong API key                      | 401    | unauthorized              |
| unknown route / model / collection / doc   | 404    | not_found                 |
| wrong method (Allow: every method of the path) | 405 | method_not_allowed       |
| headers or body not received in time (connection closed; service/http/connections.py) | 408 | request_timeout |
| CollectionExistsError                      | 409    | conflict                  |
| body, inputs, images, pixels, tokens over a limit | 413 | payload_too_large     |
| content type not JSON                      | 415    | unsupported_media_type    |
| schema violation (types, unknown fields)   | 422    | invalid_request           |
| bad input (empty, bad base64, bad image)   | 422    | invalid_input             |
| store: bad name/vector/filter/dim/dup id   | 422    | invalid_request           |
| queue full                                 | 429    | overloaded (+Retry-After) |
| client went away mid-request (logged only) | 499    | client_closed_request     |
| a batch's forward pass failed              | 500    | inference_error           |
| any other exception (a bug)                | 500    | internal_error            |
| model loading / timed out / worker dead / store unavailable | 503 | unavailable (+Retry-After) |
| --max-connections reached, no idle connection to close | 503 | unavailable (+Retry-After) |
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.storage import errors as store_errors

logger = logging.getLogger("llave.errors")


# --- the service's own errors ----------------------------------------------------------


class ApiError(Exception):
    """An error the service answers with on purpose: a status, a type and a message."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class BadRequestError(ApiError):
    status, type = 400, "invalid_json"


class UnauthorizedError(ApiError):
    status, type = 401, "unauthorized"

    def __init__(self, message: str = "missing or invalid API key") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFoundError(ApiError):
    status, type = 404, "not_found"


class PayloadTooLargeError(ApiError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaTypeError(ApiError):
    status, type = 415, "unsupported_media_type"


class InvalidRequestError(ApiError):
    status, type = 422, "invalid_request"


class InvalidInputApiError(ApiError):
    """A service-side input check (e.g. a refused image URL); same answer as the model's."""

    status, type = 422, "invalid_input"


class ClientClosedRequestError(ApiError):
    """The client went away before the answer was ready (nginx's 499; nobody reads it)."""

    status, type = 499, "client_closed_request"


class OverloadedError(ApiError):
    status, type = 429, "overloaded"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class UnavailableError(ApiError):
    status, type = 503, "unavailable"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
        super().__init__(message, headers=headers)


class InferenceError(ApiError):
    """The forward pass of the batch holding this request failed (logged with its trace)."""

    status, type = 500, "inference_error"


class ModelInputError(ApiError):
    """A model-core input error (``model.errors``), with the status from ``MODEL_ERROR_STATUS``."""

    def __init__(self, message: str, *, status: int, kind: str) -> None:
        super().__init__(message)
        self.status, self.type = status, kind


# --- the tables ------------------------------------------------------------------------

# model.errors classes by name; the error's most specific listed class (MRO order) wins.
MODEL_ERROR_STATUS: dict[str, tuple[int, str]] = {
    "ImageTooLargeError": (413, "payload_too_large"),
    "TooManyImagesError": (413, "payload_too_large"),
    "InputTooLongError": (413, "payload_too_large"),
    "EmptyInputError": (422, "invalid_input"),
    "ImageDecodeError": (422, "invalid_input"),
    "InvalidInputError": (422, "invalid_input"),
}

# By class name so that classes the store adds later (or has not added yet) are tolerated.
STORE_ERROR_STATUS: dict[str, tuple[int, str]] = {
    "CollectionNotFoundError": (404, "not_found"),
    "DocumentNotFoundError": (404, "not_found"),
    "InvalidNameError": (422, "invalid_request"),
    "DimensionMismatchError": (422, "invalid_request"),
    "InvalidVectorError": (422, "invalid_request"),
    "InvalidFilterError": (422, "invalid_request"),
    "DuplicateIdError": (422, "invalid_request"),
    "InvalidMetadataError": (422, "invalid_request"),
    "InvalidParameterError": (422, "invalid_request"),
    "CollectionExistsError": (409, "conflict"),
    "StoreUnavailableError": (503, "unavailable"),
}

HTTP_STATUS_TYPE: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "overloaded",
    503: "unavailable",
}

GENERIC_500 = "internal server error; the failure was logged"


def is_model_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``model.errors.LlaveError`` (without importing the model core)."""
    return any(c.__name__ == "LlaveError" and c.__module__ == "model.errors" for c in type(exc).__mro__)


def model_error_status(exc: BaseException) -> tuple[int, str] | None:
    """Status and type for a model-core input error; None for any other error (a 500)."""
    if not is_model_error(exc):
        return None
    for cls in type(exc).__mro__:
        if cls.__name__ in MODEL_ERROR_STATUS:
            return MODEL_ERROR_STATUS[cls.__name__]
    return None  # CheckpointError and other non-input errors are bugs or operator errors


def from_model_error(exc: BaseException) -> ApiError | None:
    """The ``ModelInputError`` for a model-core input error (keeping ``input_index``), else None."""
    mapped = model_error_status(exc)
    if mapped is None:
        return None
    error = ModelInputError(str(exc), status=mapped[0], kind=mapped[1])
    index = getattr(exc, "input_index", None)
    if index is not None:
        error.input_index = index  # type: ignore[attr-defined]
    return error


def store_error_status(exc: store_errors.StoreError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls.__name__ in STORE_ERROR_STATUS:
            return STORE_ERROR_STATUS[cls.__name__]
    return 500, "internal_error"


def error_body(kind: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"type": kind, "message": message}}


def error_response(
    status: int, kind: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(kind, message), status_code=status, headers=dict(headers or {}))


def api_error_response(exc: ApiError) -> JSONResponse:
    """The response for an ``ApiError``; also used by middleware, which runs outside handlers."""
    return error_response(exc.status, exc.type, exc.message, exc.headers)


def _with_input_index(exc: BaseException, message: str) -> str:
    index = getattr(exc, "input_index", None)
    return f"input {index}: {message}" if index is not None else message


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return 400, "invalid_json", "request body is not valid JSON"
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid value')}")
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    return 422, "invalid_request", "; ".join(parts)


# --- handlers --------------------------------------------------------------------------


async def _handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    if exc.status >= 500:
        logger.error("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(exc.status, exc.type, _with_input_index(exc, exc.message), exc.headers)


async def _handle_value_error(request: Request, exc: Exception) -> JSONResponse:
    # The model core's input errors are ValueErrors; the engine converts them already, this
    # catches any caller that used the model core directly. Other ValueErrors are bugs.
    error = from_model_error(exc)
    if error is None:
        return unexpected_error_response(request.method, request.url.path, exc)
    return error_response(error.status, error.type, _with_input_index(error, error.message))


async def _handle_store_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, store_errors.StoreError)
    status, kind = store_error_status(exc)
    if status == 503:
        logger.error("store unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(status, kind, "the collection store is unavailable", {"Retry-After": "5"})
    if status >= 500:
        logger.error("store error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(status, kind, GENERIC_500)
    return error_response(status, kind, str(exc))


async def _handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    status, kind, message = _validation_message(exc)
    return error_response(status, kind, message)


async def _handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = HTTP_STATUS_TYPE.get(exc.status_code, "internal_error" if exc.status_code >= 500 else "error")
    message = exc.detail if isinstance(exc.detail, str) else kind.replace("_", " ")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names only the methods of the first route that matched the path; a path
        # served by several routes (GET, PUT and DELETE /collections/{name}) has them all.
        headers["Allow"] = ", ".join(allowed_methods(request))
    return error_response(exc.status_code, kind, message, headers)


HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path, sorted.

    Asks the router itself (each route's ``matches``, which included routers answer for
    their own routes too) whether the path would be served with each method.
    """
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


def unexpected_error_response(method: str, path: str, exc: BaseException) -> JSONResponse:
    """A bug: log the trace, answer a generic 500 that leaks nothing.

    Called by the outermost middleware (``service/http/app.py``) so that the response is counted
    in the metrics and Starlette does not log the same trace a second time.
    """
    logger.error("unhandled error on %s %s", method, path, exc_info=exc)
    return error_response(500, "internal_error", GENERIC_500)


def install_error_handlers(app: FastAPI) -> None:
    """Register the one mapping from typed errors to HTTP responses."""
    app.add_exception_handler(ApiError, _handle_api_error)
    app.add_exception_handler(store_errors.StoreError, _handle_store_error)
    app.add_exception_handler(ValueError, _handle_value_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    # Anything else is caught by the request middleware: unexpected_error_response().
