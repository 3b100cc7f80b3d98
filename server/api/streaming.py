"""Shared by the generation routes: building an engine request, waiting for it (or for several: n choices,
several prompts), server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from moe import RoutingSpec
from moe.decode.sampling import SamplingParams
from moe.decode.sequence import ERROR, Event, Finished, GenerationFailedError, GenerationRequest
from moe.decode.structured_output import GrammarSpec
from server.engine import Engine
from server.errors import BadRequestError, error_object
from server.requests import RequestHandle
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
    default_new_tokens: int | None = None,
    max_tokens_param: str = "max_new_tokens",
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: tuple[tuple[int, float], ...] = (),
    stop_token_ids: list[int] | None = None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    grammar: GrammarSpec | None = None,
) -> GenerationRequest:
    """Raises RoutingSpecError / SamplingParamsError / BadRequestError (400) for settings that cannot be served,
    and a 400 stating the cap for max_new_tokens over --max-new-tokens or over the room the context leaves.

    max_new_tokens None: default_new_tokens (or the cap), shortened to fit the context."""
    if top_k > engine.vocab_size:
        raise BadRequestError(
            f"top_k {top_k} is larger than the model's vocabulary of {engine.vocab_size} tokens; use 0 for no limit",
            param="top_k",
        )
    routing = routing or Routing()
    room = engine.context_limit - len(prompt_ids)
    if max_new_tokens is None:
        limit = min(default_new_tokens or settings.max_new_tokens, settings.max_new_tokens, max(1, room))
    elif max_new_tokens > settings.max_new_tokens:
        raise BadRequestError(
            f"{max_tokens_param}={max_new_tokens} is over this server's cap of {settings.max_new_tokens} tokens "
            "(--max-new-tokens); ask for at most that",
            param=max_tokens_param,
        )
    elif max_new_tokens > room > 0:
        raise BadRequestError(
            f"{max_tokens_param}={max_new_tokens} does not fit: the prompt has {len(prompt_ids)} tokens and the "
            f"context limit is {engine.context_limit}; ask for at most {room}",
            param=max_tokens_param,
        )
    else:
        limit = max_new_tokens
    stops = (stop,) if isinstance(stop, str) else tuple(s for s in (stop or ()) if s)
    sampling = SamplingParams(
        temperature,
        top_p,
        top_k,
        seed,
        min(min_new_tokens, limit),
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty,
        logit_bias=logit_bias,
        stop_token_ids=tuple(stop_token_ids or ()),
        logprobs=logprobs,
    )
    return GenerationRequest(
        prompt_ids=prompt_ids,
        max_new_tokens=limit,
        sampling=sampling,
        stop=tuple(s for s in stops if s),
        routing=RoutingSpec(routing.mode, routing.expert, tuple(routing.allow) if routing.allow is not None else None),
        prompt_logprobs=prompt_logprobs,
        grammar=grammar,
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


async def wait_for_results(handles: list[RequestHandle], request: Request) -> list[Finished]:
    """Every request's result, in order; all are cancelled when the client disconnects first."""
    return list(await asyncio.gather(*(wait_for_result(handle, request) for handle in handles)))


async def merged_events(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Event]]:
    """(index, event) of several requests as they come; a client that goes away cancels them all."""
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
