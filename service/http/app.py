"""The app factory: ``create_app(settings) -> FastAPI``.

Nothing heavy happens at import or in the factory. The app is one front end: it talks to
an engine process (``service/inference/``) and to the collection store.

- Given ``engine=EngineLink(engines)`` (``python -m service`` with several front ends), it
  connects to the engines (one per device) its parent supervises.
- Without it (one front end, and in-process use such as tests), the lifespan starts and
  supervises its own engine processes; the model loads and warms up there in the
  background, so ``/health`` and ``/ready`` answer meanwhile.
- Given ``store=`` (a store client, or an opened store), it uses it; otherwise the
  lifespan opens the store named by the settings in this process.

What routes find on ``request.app.state``:

- ``settings``: the ``Settings`` in force;
- ``engine``: the ``EngineClient``; ``await engine.embed(inputs, truncate=..., normalize=...)``
  returns an ``EmbedResult`` (``.embeddings`` float32 (n, dim), ``.usage``, ``.timings``),
  see ``service/inference/client.py``; ``engine.dim`` once ready;
- ``store``: the collection store (``None`` until the lifespan has opened it);
- ``metrics``: the ``Metrics`` (Prometheus registry of this app).

Middleware, outermost first: request accounting (``llave_requests_total``, and the generic
500 for unexpected errors), CORS (only when origins are configured), API key (only when
configured), body limit and JSON content type.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.errors import install_error_handlers, unexpected_error_response
from service.http.routes import collections, embed, health, openai, page, search
from service.http.security import ApiKeyMiddleware, BodyLimitMiddleware
from service.inference.client import EngineClient
from service.inference.images import ImageFetcher
from service.inference.supervisor import EngineGroup
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger("llave.app")

API_DESCRIPTION = """\
Multimodal embeddings with LLaVE: text, images and interleaved image+text become one
vector each. Inputs are `{"text"?, "image"?, "instruction"?}` or
`{"content": [{"type": "text", "text": ...} | {"type": "image", "image": ...}], "instruction"?}`,
images as base64 or `data:` URIs. Errors are `{"error": {"type", "message"}}`.
"""


class RequestAccountingMiddleware:
    """Counts every answered request by route template and status; turns bugs into a generic 500."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, paths: Callable[[], Iterable[str]]) -> None:
        self.app = app
        self.metrics = metrics
        self._paths = paths  # route templates, to label requests refused before routing
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    def _route_label(self, scope: Scope) -> str:
        route = scope.get("route")
        if getattr(route, "path", None):
            return str(route.path)  # type: ignore[union-attr]
        if self._templates is None:  # built once, after every route is registered
            self._templates = [
                (re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(p)) + "$"), p)
                for p in self._paths()
            ]
        path = scope.get("path", "")
        return next((template for regex, template in self._templates if regex.match(path)), "unmatched")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        unanswered = 500  # the label when no response was sent
        try:
            await self.app(scope, receive, send_and_record)
            unanswered = 499  # returned without answering: the client left (or its body timed out)
        except Exception as exc:
            if status:  # the response had started: nothing else can be sent
                logger.error("error after the response started on %s", scope.get("path"), exc_info=exc)
            else:
                response = unexpected_error_response(scope.get("method", ""), scope.get("path", ""), exc)
                await response(scope, receive, send_and_record)
        finally:
            label = str(status or unanswered)
            self.metrics.requests.labels(route=self._route_label(scope), status=label).inc()


def _open_store(settings: Settings) -> Any:
    if settings.store_url:
        from service.storage.postgres import PostgresCollectionStore, redacted

        pg = PostgresCollectionStore(settings.store_url, read_url=settings.store_read_url)
        pg.open()
        logger.info(
            "collection store open in PostgreSQL at %s%s",
            redacted(settings.store_url),
            f", reads from {redacted(settings.store_read_url)}" if settings.store_read_url else "",
        )
        return pg
    from service.storage.store import CollectionStore  # imports faiss: not at module import

    store = CollectionStore(settings.data_dir, index_snapshots=settings.index_snapshots)
    store.open()
    logger.info("collection store open in %s", settings.data_dir)
    return store


@dataclass(frozen=True)
class EngineLink:
    """Where a front end finds the engines that another process supervises."""

    engines: tuple[tuple[str, str, str], ...]  # (address, status board, device) per engine
    queue_share: int | None = None  # this front end's share of --max-queue


def create_app(
    settings: Settings,
    *,
    engine: EngineLink | None = None,
    store: Any = None,
    embedder_factory: str | None = None,
    on_engine_give_up: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the app (see the module docstring for ``engine`` and ``store``)."""
    metrics = Metrics()
    config = settings.engine_config(embedder_factory)
    images = ImageFetcher(
        settings.image_url_allow_hosts,
        allow_private=settings.image_url_allow_private,
        max_bytes=settings.image_url_max_bytes,
        video_max_bytes=settings.max_video_bytes,
        timeout_s=settings.image_url_timeout_s,
    )
    run_dir: tempfile.TemporaryDirectory[str] | None = None
    supervisor: EngineGroup | None = None
    if engine is None:
        run_dir = tempfile.TemporaryDirectory(prefix="llave-")
        supervisor = EngineGroup(
            settings.engine_configs(embedder_factory),
            run_dir.name,
            log_level=settings.log_level,
            require_all=settings.require_all_devices,
            on_give_up=on_engine_give_up,
        )
        engine = EngineLink(tuple(supervisor.links))
    client = EngineClient(
        config,
        engine.engines,
        images,
        metrics,
        queue_share=engine.queue_share,
        served_names=[settings.model_name],
        require_all=settings.require_all_devices,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if supervisor is not None:
            await asyncio.to_thread(supervisor.start)
        await client.start()
        try:
            app.state.store = store if store is not None else await asyncio.to_thread(_open_store, settings)
        except BaseException:
            await _stop_engine(client, supervisor, run_dir)
            raise
        try:
            yield
        finally:
            await _stop_engine(client, supervisor, run_dir)
            opened, app.state.store = app.state.store, None
            if opened is not None:
                await asyncio.to_thread(opened.close)

    app = FastAPI(
        title="LLaVE embedding server",
        version="0.1.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = client
    app.state.supervisor = supervisor
    app.state.metrics = metrics
    app.state.store = None

    install_error_handlers(app)
    app.include_router(embed.router)
    app.include_router(openai.router)
    app.include_router(collections.router)
    app.include_router(search.router)
    app.include_router(health.router)
    app.include_router(page.router)

    # add_middleware() wraps what is there: the last added is the outermost.
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_buffered_bytes=settings.max_buffered_body_bytes,
        retry_after_s=settings.retry_after_s,
        gauge=metrics.body_bytes,
    )
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
        _document_bearer_auth(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=[
                "x-llave-preprocess-ms",
                "x-llave-queue-ms",
                "x-llave-inference-ms",
                "Retry-After",
            ],
        )
    app.add_middleware(
        RequestAccountingMiddleware, metrics=metrics, paths=lambda: list(app.openapi().get("paths", {}))
    )
    return app


async def _stop_engine(
    client: EngineClient,
    supervisor: EngineGroup | None,
    run_dir: tempfile.TemporaryDirectory[str] | None,
) -> None:
    await client.stop()
    if supervisor is not None:
        await asyncio.to_thread(supervisor.stop)
    if run_dir is not None:
        run_dir.cleanup()


def _document_bearer_auth(app: FastAPI) -> None:
    """Show the API key in /docs ("Authorize"); enforcement is ``ApiKeyMiddleware``'s."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearerAuth": {"type": "http", "scheme": "bearer"}
            }
            schema["security"] = [{"bearerAuth": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
