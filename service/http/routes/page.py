"""The search page: ``GET /`` and its static files under ``/page/``.

Plain files shipped in the package (``service/http/static/``), no build step and nothing
fetched from elsewhere, so the page works offline. They are served without an API key
(``PAGE_PATHS`` in ``service/http/security.py``): the page asks for the key itself when a
request gets 401 and keeps it in the browser's session storage. Only the files named in
``FILES`` are served; their bytes are read once, at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from service.http.errors import NotFoundError
from service.http.schemas import ErrorResponse

STATIC = Path(__file__).resolve().parents[1] / "static"
FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_CONTENT = {name: (STATIC / name).read_bytes() for name in FILES}
# Revalidate each time (cheap, and a new version of the server is picked up at once);
# the page holds no secret, the key lives in the browser's session storage only.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# The page runs only its own script and styles and talks only to this server; images (and a
# query video's preview) are shown from data: URIs and blob: URLs.
_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; media-src data: blob:; script-src 'self'; "
    "style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(tags=["page"])
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Not one of the page's files"}
}


def _file(name: str) -> Response:
    headers = dict(_HEADERS)
    if name == "index.html":
        headers["Content-Security-Policy"] = _CSP
    return Response(_CONTENT[name], media_type=FILES[name], headers=headers)


@router.get(
    "/",
    response_class=Response,
    responses={200: {"content": {"text/html": {}}, "description": "The search page"}},
    summary="The search page (no API key needed: it asks for one)",
)
async def page() -> Response:
    return _file("index.html")


@router.get(
    "/page/{name}",
    response_class=Response,
    responses={
        200: {"content": {m.split(";")[0]: {} for m in FILES.values()}, "description": "A file of the page"},
        **_NOT_FOUND,
    },
    summary="The search page's script and style sheet",
)
async def page_file(name: str) -> Response:
    if name not in FILES:
        raise NotFoundError(f"no page file {name!r}")
    return _file(name)
