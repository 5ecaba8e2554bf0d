"""Request guards, as plain ASGI middleware so they cover every route, later ones included.

- ``ApiKeyMiddleware``: when an API key is configured, every path but the public ones
  (``PUBLIC_PATHS``) needs ``Authorization: Bearer <key>`` (constant-time comparison);
  401 otherwise, before the body is read.
- ``BodyLimitMiddleware``: bodies of POST/PUT/PATCH must be JSON (415 otherwise) and at
  most ``max_body_bytes``: a larger ``Content-Length`` is refused at once, and the body
  stream is counted as it arrives (chunked bodies included), so an oversized body is
  refused (413) after at most ``max_body_bytes`` have been read and before any JSON
  parsing. The body is then replayed to the app. The bodies one process holds at once
  (from their first byte until the answer is sent) are bounded by ``max_buffered_bytes``:
  a declared length is reserved before reading, a chunked body as it arrives; a request
  that does not fit gets 429 with Retry-After.

Their error responses come from ``service/http/errors.py`` (the one place statuses are mapped).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.budget import ByteBudget
from service.http.errors import (
    ApiError,
    BadRequestError,
    OverloadedError,
    PayloadTooLargeError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    api_error_response,
)

PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
# The search page and its static files (service/http/routes/page.py): it asks for the key itself.
PAGE_PATHS = frozenset({"/", "/page/index.html", "/page/app.js", "/page/style.css"})
PUBLIC_PATHS = PUBLIC_PATHS | PAGE_PATHS
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


async def _refuse(exc: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    await api_error_response(exc)(scope, receive, send)


def is_json_media_type(content_type: bytes | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, *, api_key: str, public_paths: Iterable[str] = PUBLIC_PATHS) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._public = frozenset(public_paths)

    def authorized(self, header: bytes | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.strip().partition(b" ")
        presented = b"Bearer " + token.strip() if scheme.lower() == b"bearer" else b""
        return hmac.compare_digest(presented, self._expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _path(scope) in self._public:
            await self.app(scope, receive, send)
            return
        if not self.authorized(_header(scope, b"authorization")):
            await _refuse(UnauthorizedError(), scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_buffered_bytes: int | None = None,
        retry_after_s: int = 1,
        gauge: Any = None,
        non_json_prefixes: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Bytes of bodies held by this process at once, from the first byte to the answer.
        self.buffered = ByteBudget(max_buffered_bytes or max(max_body_bytes, 1), gauge)
        self.retry_after_s = retry_after_s
        self._non_json = tuple(non_json_prefixes)

    def _full(self) -> OverloadedError:
        return OverloadedError(
            "the server holds as many request bodies as it may; retry later",
            retry_after_s=self.retry_after_s,
        )

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"request body is larger than the limit of {self.max_body_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return

        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _refuse(BadRequestError("invalid Content-Length header"), scope, receive, send)
                return
            if int(declared) > self.max_body_bytes:
                await _refuse(self._too_large(), scope, receive, send)
                return
        chunked = b"chunked" in (_header(scope, b"transfer-encoding") or b"").lower()
        may_have_body = chunked or (declared is not None and int(declared) > 0)
        content_type = _header(scope, b"content-type")
        path = _path(scope)
        if (
            (content_type is not None or may_have_body)
            and not is_json_media_type(content_type)
            and not path.startswith(self._non_json)
        ):
            await _refuse(
                UnsupportedMediaTypeError("request body must be JSON (Content-Type: application/json)"),
                scope,
                receive,
                send,
            )
            return

        # A declared length is held before the first byte is read (the client is told at
        # once); a chunked body is held as it comes.
        held = int(declared) if declared is not None else 0
        if not self.buffered.take(held):
            await _refuse(self._full(), scope, receive, send)
            return
        try:
            await self._buffer_and_run(scope, receive, send, held)
        finally:
            self.buffered.give_back(held)

    async def _buffer_and_run(self, scope: Scope, receive: Receive, send: Send, declared: int) -> None:
        chunks: list[bytes] = []
        size = 0
        extra = 0  # bytes held beyond the declared length (chunked bodies)
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client left mid-body: nobody to answer
                body = message.get("body", b"")
                size += len(body)
                if size > self.max_body_bytes:
                    await _refuse(self._too_large(), scope, receive, send)
                    return
                if size > declared + extra:
                    if not self.buffered.take(size - declared - extra):
                        await _refuse(self._full(), scope, receive, send)
                        return
                    extra = size - declared
                chunks.append(body)
                if not message.get("more_body", False):
                    break
            await self._run(scope, receive, send, chunks)
        finally:
            self.buffered.give_back(extra)

    async def _run(self, scope: Scope, receive: Receive, send: Send, chunks: list[bytes]) -> None:
        """Run the app with the buffered body replayed to it."""
        body = [b"".join(chunks)]
        chunks.clear()  # one copy of the body, not two

        async def replay() -> Message:
            if body:
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        await self.app(scope, replay, send)
