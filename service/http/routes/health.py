"""Probes and introspection: ``/health``, ``/ready``, ``/info``, ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.http.routes.common import get_engine
from service.http.schemas import ErrorResponse, ProbeResponse
from service.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


def _probe(
    status_code: int, status: str, devices: list[dict[str, Any]], message: str | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"status": status, "devices": devices}
    if message is not None:
        body["error"] = {"type": "unavailable", "message": message}
    return JSONResponse(body, status_code=status_code)


@router.get(
    "/health",
    response_model=ProbeResponse,
    responses={503: {"model": ProbeResponse, "description": "No model engine is running"}},
    summary="Liveness: 503 when no engine runs (each died, or the model failed to load); "
    "with --require-all-devices, when any one does not",
)
async def health(request: Request) -> JSONResponse:
    engine = get_engine(request)
    devices = engine.devices()
    if not engine.alive:
        return _probe(503, engine.state, devices, "the model engine is not running")
    return _probe(200, "ok", devices)


@router.get(
    "/ready",
    response_model=ProbeResponse,
    responses={503: {"model": ProbeResponse, "description": "Still loading or warming up, or dead"}},
    summary="Readiness: 200 once an engine has loaded and warmed up the model (with "
    "--require-all-devices, every engine)",
)
async def ready(request: Request) -> JSONResponse:
    engine = get_engine(request)
    devices = engine.devices()
    if engine.ready:
        return _probe(200, "ready", devices)
    if not engine.alive:
        return _probe(503, engine.state, devices, "the model engine is not running")
    return _probe(503, engine.state, devices, f"the model is {engine.state}")


@router.get(
    "/info",
    responses={401: {"model": ErrorResponse}},
    summary="Model, dimension, dtype, device and the limits in force",
)
async def info(request: Request) -> dict[str, Any]:
    engine = get_engine(request)
    s = request.app.state.settings
    facts = engine.describe()
    limits = s.limits()
    if facts["max_length"] is not None:
        limits["max_input_tokens"] = facts["max_length"]
    return {
        "model": s.model_name,
        **facts,
        "limits": limits,
        "batching": {
            "max_batch_size": s.max_batch_size,
            "max_batch_tokens": s.max_batch_tokens,
            "max_wait_ms": s.max_wait_ms,
            "batch_sort_window": s.batch_sort_window,
            "preprocess_workers": s.preprocess_workers,
        },
        "devices": engine.devices(),
        "processes": {
            "api_workers": s.api_workers,
            "engines": len(engine.connections),
            "engine_restarts": s.engine_restarts,
            "require_all_devices": s.require_all_devices,
        },
        "auth": s.api_key is not None,
    }


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
