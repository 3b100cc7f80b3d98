"""Shared by the generation routes: waiting for engine requests (one, or several: n choices, several
prompts), server-sent events. Building them is server.api.validation's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from moe.decode.sequence import ERROR, Event, Finished, GenerationFailedError
from server.errors import error_object
from server.requests import RequestHandle

DISCONNECT_POLL_S = 0.25


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


async def wait_for_results(handles: list[RequestHandle], request: Request) -> list[Finished]:
    """Every request's result, in order; all are cancelled when the client disconnects first."""
    return list(await asyncio.gather(*(wait_for_result(handle, request) for handle in handles)))


async def merged_events(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Event]]:
    """(index, event) of several requests as they come; a client that goes away cancels them all."""
    if len(handles) == 1:  # the common case, read directly: no pump task and second queue per token
        async for event in events_until_done(handles[0]):
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        async for event in handle.events():
            await queue.put((index, event))

    tasks = [asyncio.ensure_future(pump(index, handle)) for index, handle in enumerate(handles)]
    running = len(handles)
    try:
        while running:
            index, event = await queue.get()
            yield index, event
            if event.finished is not None:
                running -= 1
    finally:
        for task in tasks:
            task.cancel()
        for handle in handles:
            handle.cancel()  # no effect once finished


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
