"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import MetricsDep
from server.auth import has_api_key
from server.expert_store import StoreCorruptError, StoreUnavailableError
from server.metrics import STORE_USAGE_MAX_AGE_S
from server.schemas import error_responses

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/health", responses=error_responses())
async def health() -> dict[str, str]:
    """The process is up (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "loading, stopped or stale"}, **error_responses()})
async def ready(request: Request) -> JSONResponse:
    """200 when the model is loaded, the engine loop runs and the expert set served is the store's current
    one; 503 otherwise: loading, warming (the engine compiles its decode steps, --compile-decode, before its
    first step), stopped, or stale (the store has held a newer expert-set version for more than two poll
    intervals and this server could not apply it). Under --api-keys it is open (a probe sends no key) and
    answers a caller without a key with its status only."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.alive:
        return JSONResponse({"status": "loading" if engine is None else "stopped"}, status_code=503)
    if engine.warming:
        return JSONResponse({"status": "warming"}, status_code=503)
    served = request.app.state.experts
    stale_after_s = max(2 * request.app.state.settings.poll_interval_s, 2.0)
    stale = served.behind_s() > stale_after_s
    body = {
        "status": "stale" if stale else "ready",
        "experts": list(engine.model.plugged.names),
        "running": engine.running,
        "queued": engine.queue_depth,
        "version": served.version,
        "store_version": served.store_version,
    }
    if served.skipped:
        body["skipped"] = served.skipped
    if served.store_error:
        body["store_error"] = served.store_error
    if not has_api_key(request.headers, request.app.state.settings):  # open for probes: the status, no details
        body = {"status": body["status"]}
    return JSONResponse(body, status_code=503 if stale else 200)


@router.get(
    "/metrics",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **error_responses()},
    response_class=Response,
)
async def metrics(request: Request, metrics: MetricsDep) -> Response:
    await _read_store_usage(request)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _read_store_usage(request: Request) -> None:
    """Refresh the expert store's size metrics, at most every STORE_USAGE_MAX_AGE_S (a listing of the store
    per scrape would be one LIST request per scrape on S3). A store that cannot be read keeps the last values."""
    served = getattr(request.app.state, "experts", None)
    last = getattr(request.app.state, "store_usage_read_at", None)
    if served is None or (last is not None and time.monotonic() - last < STORE_USAGE_MAX_AGE_S):
        return
    request.app.state.store_usage_read_at = time.monotonic()
    try:
        await asyncio.to_thread(served.read_store_usage)
    except (StoreUnavailableError, StoreCorruptError, OSError) as e:
        logger.warning("cannot read the expert store's size for /metrics: %s", e)
