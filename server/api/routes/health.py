"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import MetricsDep
from server.schemas import error_responses

router = APIRouter(tags=["health"])


@router.get("/health", responses=error_responses())
async def health() -> dict[str, str]:
    """The process is up (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "loading or stopped"}, **error_responses()})
async def ready(request: Request) -> JSONResponse:
    """200 when the model is loaded and the engine loop runs; 503 otherwise."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.alive:
        return JSONResponse({"status": "loading" if engine is None else "stopped"}, status_code=503)
    return JSONResponse(
        {
            "status": "ready",
            "experts": list(engine.model.plugged.names),
            "running": engine.running,
            "queued": engine.queue_depth,
        }
    )


@router.get(
    "/metrics",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **error_responses()},
    response_class=Response,
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
