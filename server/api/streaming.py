"""Shared by the generation routes: building an engine request, waiting for it, server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from moe import RoutingSpec
from moe.sampling import SamplingParams
from server.engine import Engine
from server.errors import BadRequestError, error_object
from server.requests import ERROR, Event, Finished, GenerationFailedError, GenerationRequest, RequestHandle
from server.schemas import Routing
from server.settings import Settings

DISCONNECT_POLL_S = 0.25


def build_request(
    engine: Engine,
    settings: Settings,
    prompt_ids: list[int],
    *,
    max_new_tokens: int | None,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    routing: Routing | None = None,
) -> GenerationRequest:
    """Raises RoutingSpecError / SamplingParamsError / BadRequestError (400) for settings that cannot be served."""
    if top_k > engine.vocab_size:
        raise BadRequestError(
            f"top_k {top_k} is larger than the model's vocabulary of {engine.vocab_size} tokens; use 0 for no limit",
            param="top_k",
        )
    routing = routing or Routing()
    room = max(1, engine.context_limit - len(prompt_ids))
    limit = min(max_new_tokens or settings.max_new_tokens, settings.max_new_tokens, room)
    stops = (stop,) if isinstance(stop, str) else tuple(s for s in (stop or ()) if s)
    return GenerationRequest(
        prompt_ids=prompt_ids,
        max_new_tokens=limit,
        sampling=SamplingParams(temperature, top_p, top_k, seed, min(min_new_tokens, limit)),
        stop=tuple(s for s in stops if s),
        routing=RoutingSpec(routing.mode, routing.expert, tuple(routing.allow) if routing.allow is not None else None),
    )


async def wait_for_result(handle: RequestHandle, request: Request) -> Finished:
    """The finished request; cancels it when the client disconnects first. A request that failed raises its
    error (500, or 503 when the server is shutting down), so a failure is never an HTTP 200."""
    result = asyncio.ensure_future(handle.result())
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=DISCONNECT_POLL_S)
            if done:
                finished = result.result()
                if finished.reason == ERROR:
                    raise finished.error or GenerationFailedError(finished.message or "generation failed")
                return finished
            if await request.is_disconnected():
                handle.cancel()
    finally:
        if not result.done():
            handle.cancel()
            result.cancel()


async def events_until_done(handle: RequestHandle) -> AsyncIterator[Event]:
    """The request's events; a client that goes away (the generator is closed) cancels the request."""
    try:
        async for event in handle.events():
            yield event
    finally:
        handle.cancel()  # no effect once finished


def stream_error(finished: Finished) -> dict[str, Any] | None:
    """The error object a stream's last event carries when its request failed (None otherwise)."""
    if finished.reason != ERROR:
        return None
    return error_object(finished.error or GenerationFailedError(finished.message or "generation failed"))


def sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
