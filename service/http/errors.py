"""Every error the service answers with, mapped to an HTTP status in this one place.

Domain code raises typed errors and knows nothing about HTTP:

- the model core raises ``model.errors.InvalidInputError`` subclasses for bad inputs
  (``input_index`` set by the inference layer),
- the inference layer raises ``service.inference.errors`` classes (engine unavailable,
  overloaded, too many inputs, forward failed),
- the collection store raises ``service.storage.errors.StoreError`` subclasses,
- the HTTP layer itself raises ``ApiError`` subclasses below (limits, auth, not found...).

Each is mapped by its type (the most specific listed class wins), never by its name, so
a renamed or moved class fails the import here instead of silently becoming a 500.

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
| body, inputs, images, videos, pixels, tokens over a limit | 413 | payload_too_large |
| content type not JSON                      | 415    | unsupported_media_type    |
| schema violation (types, unknown fields)   | 422    | invalid_request           |
| bad input (empty, bad base64, bad image or video) | 422 | invalid_input          |
| store: bad name/vector/filter/dim/dup id   | 422    | invalid_request           |
| queue full, pixel or body budget full      | 429    | overloaded (+Retry-After) |
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

from model import errors as model_errors
from service.inference import errors as inference_errors
from service.storage import errors as store_errors
from service.storage.sources import SourceTooLargeError

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


# --- the tables ------------------------------------------------------------------------
# Checked in order: the first class the error is an instance of gives (status, type).

MODEL_ERROR_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (model_errors.ImageTooLargeError, 413, "payload_too_large"),
    (model_errors.VideoTooLargeError, 413, "payload_too_large"),
    (model_errors.TooManyImagesError, 413, "payload_too_large"),
    (model_errors.InputTooLongError, 413, "payload_too_large"),
    (model_errors.InvalidInputError, 422, "invalid_input"),  # empty input, bad image, ...
)

INFERENCE_ERROR_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (inference_errors.EngineUnavailableError, 503, "unavailable"),
    (inference_errors.EngineOverloadedError, 429, "overloaded"),
    (inference_errors.TooManyInputsError, 413, "payload_too_large"),
    (inference_errors.PixelsTooLargeError, 413, "payload_too_large"),
    (inference_errors.NoInputsError, 422, "invalid_request"),
    (inference_errors.ForwardError, 500, "inference_error"),
    (inference_errors.PreprocessError, 500, "inference_error"),
)

STORE_ERROR_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (store_errors.CollectionNotFoundError, 404, "not_found"),
    (store_errors.DocumentNotFoundError, 404, "not_found"),
    (store_errors.CollectionExistsError, 409, "conflict"),
    (store_errors.StoreUnavailableError, 503, "unavailable"),
    (SourceTooLargeError, 413, "payload_too_large"),
    (store_errors.StoreError, 422, "invalid_request"),  # names, vectors, filters, dims, ids, options
)


def _lookup(
    exc: BaseException, table: tuple[tuple[type[Exception], int, str], ...]
) -> tuple[int, str] | None:
    for cls, status, kind in table:
        if isinstance(exc, cls):
            return status, kind
    return None


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


def model_error_status(exc: BaseException) -> tuple[int, str] | None:
    """Status and type for a model-core input error; None for any other error."""
    return _lookup(exc, MODEL_ERROR_STATUS)


def store_error_status(exc: store_errors.StoreError) -> tuple[int, str]:
    return _lookup(exc, STORE_ERROR_STATUS) or (500, "internal_error")


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
    return 422, "invalid_request", describe_validation_errors(list(errors), getattr(exc, "body", None))


# pydantic's "Input should be a valid X" -> what a JSON client should send.
_EXPECTED = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "list": "a list",
    "array": "a list",
    "dictionary": "an object",
    "dict": "an object",
}


def describe_validation_errors(errors: list[dict], body: object) -> str:
    """One sentence naming the field and what was expected, from pydantic's errors.

    A value that matches no member of a union gets one error per member (pydantic's "union
    dump"); the member errors are told apart by walking each error's location through the
    request body itself, so the labels pydantic puts in locations for union members are
    dropped, and the error that got deepest into the body is the one reported. Errors on
    other top-level fields are counted, not spelled out.
    """
    located = [(_field_path(err.get("loc", ()), body, err.get("type") == "missing"), err) for err in errors]
    if not located:
        return "the request does not match the schema (see /docs)"
    groups: dict[object, list[tuple[list[str | int], dict]]] = {}
    for path, err in located:
        groups.setdefault(path[0] if path else None, []).append((path, err))
    first = next(iter(groups.values()))
    # The deepest wins; at equal depth, a wrong value beats a missing or unknown field (those
    # come from union members the body was not meant for). max() keeps the first of equals.
    path, err = max(first, key=lambda item: (len(item[0]), item[1].get("type") not in _MEMBER_MISMATCH))
    message = f"{_format_path(path) or 'the body'} {_expectation(err)}"
    others = [key for key in groups if key is not next(iter(groups))]
    if others:
        names = ", ".join(str(key) for key in others[:5])
        message += f" (and {len(others)} other invalid field{'s' if len(others) > 1 else ''}: {names})"
    return message


_MEMBER_MISMATCH = ("missing", "extra_forbidden")


def _field_path(loc: tuple | list, body: object, missing: bool = False) -> list[str | int]:
    """The error's location as real fields and indexes of ``body``, union labels dropped."""
    items = [p for p in loc if p != "body"] if loc and loc[0] == "body" else list(loc)
    path: list[str | int] = []
    current = body
    for i, item in enumerate(items):
        last = i == len(items) - 1
        if isinstance(current, list) and isinstance(item, int) and 0 <= item < len(current):
            path.append(item)
            current = current[item]
        elif isinstance(current, dict) and isinstance(item, str) and item in current:
            nxt = items[i + 1] if not last else None
            child = current[item]
            # A discriminated union's tag ('text', 'image') can equal a key of the object: it is
            # a tag when the next location item is another key of the same object.
            if not isinstance(child, dict | list) and isinstance(nxt, str) and nxt in current:
                continue
            path.append(item)
            current = child
        elif last and missing and isinstance(current, dict) and isinstance(item, str):
            path.append(item)  # a missing field, named by the last item
            current = None
        # anything else is a union member's label
    return path


def _format_path(path: list[str | int]) -> str:
    out = ""
    for item in path:
        out += f"[{item}]" if isinstance(item, int) else (f".{item}" if out else str(item))
    return out


def _describe_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else "a long string"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, dict):
        return "an object"
    return "a value of another type"


def _expectation(err: dict) -> str:
    kind = str(err.get("type", ""))
    msg = str(err.get("msg", "is invalid"))
    got = f", got {_describe_value(err.get('input'))}" if "input" in err else ""
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a field of this request (see /docs for the request's fields)"
    if kind in ("value_error", "assertion_error"):
        return "is invalid: " + msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "union_tag_invalid":
        return f"has type {ctx.get('tag')!r}; expected type {ctx.get('expected_tags', 'a known type')}"
    if kind == "union_tag_not_found":
        return f"needs a {str(ctx.get('discriminator', 'type')).strip(chr(39))!r} field naming its type"
    if kind == "model_type" or kind == "dict_type" or kind == "model_attributes_type":
        return "must be an object" + got
    if msg.startswith("Input should be a valid "):
        noun = msg.removeprefix("Input should be a valid ").split(",")[0].split(" ")[0]
        return f"must be {_EXPECTED.get(noun, 'a valid ' + noun)}{got}"
    if msg.startswith("Input should be "):
        return "must be " + msg.removeprefix("Input should be ") + got
    if msg.startswith(("List should", "String should", "Value should")):
        return "must" + msg.split("should", 1)[1].split(" after validation")[0] + got
    return msg[:1].lower() + msg[1:] + got


# --- handlers --------------------------------------------------------------------------


async def _handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    if exc.status >= 500:
        logger.error("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(exc.status, exc.type, _with_input_index(exc, exc.message), exc.headers)


async def _handle_model_error(request: Request, exc: Exception) -> JSONResponse:
    mapped = model_error_status(exc)
    if mapped is None:  # CheckpointError and other non-input errors: bugs or operator errors
        return unexpected_error_response(request.method, request.url.path, exc)
    return error_response(mapped[0], mapped[1], _with_input_index(exc, str(exc)))


async def _handle_inference_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, inference_errors.InferenceError)
    status, kind = _lookup(exc, INFERENCE_ERROR_STATUS) or (500, "internal_error")
    headers: dict[str, str] = {}
    retry_after = str(getattr(request.app.state.settings, "retry_after_s", 1))
    if status == 429 or (status == 503 and getattr(exc, "retry", False)):
        headers["Retry-After"] = retry_after
    if status >= 500:
        logger.error("%s %s -> %d %s", request.method, request.url.path, status, exc.message)
    return error_response(status, kind, _with_input_index(exc, exc.message), headers)


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
    app.add_exception_handler(model_errors.LlaveError, _handle_model_error)
    app.add_exception_handler(inference_errors.InferenceError, _handle_inference_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    # Anything else is caught by the request middleware: unexpected_error_response().
