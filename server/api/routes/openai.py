"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

`model` is the backbone's name (routing as the request's `routing` extension says, token mode by default)
or a plugged expert's name, which pins that expert. Responses carry a `plugmoe` field with route shares.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.deps import EngineDep, PromptsDep
from server.api.streaming import SSE_HEADERS, build_request, events_until_done, sse, stream_error, wait_for_result
from server.auth import ApiKey, SettingsDep
from server.engine import Engine
from server.errors import BadRequestError, NotFoundError
from server.requests import Finished, RequestHandle
from server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    Routing,
    TextPart,
    error_responses,
    stream_response,
)
from server.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ApiKey])
STARTED = int(time.time())
_GENERATION = {
    **stream_response("a completion (server-sent chunks with stream: true)"),
    **error_responses(400, 404, 503),
}


@router.get("/models", response_model=ModelList, responses=error_responses(503))
async def list_models(engine: EngineDep, settings: SettingsDep) -> ModelList:
    cards = [ModelCard(id=settings.served_model_name(), created=STARTED)]
    cards += [ModelCard(id=name, created=STARTED, plugmoe_kind="expert") for name in engine.model.plugged.names]
    return ModelList(data=cards)


@router.post("/completions", responses=_GENERATION)
async def completions(
    body: CompletionRequest, request: Request, engine: EngineDep, prompts: PromptsDep, settings: SettingsDep
):
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequestError(f"one prompt per request is supported, got {len(prompt)}")
        prompt = prompt[0]
    return await _serve(
        body, await prompts.encode(prompt), "text_completion", request, engine, settings, body.max_tokens or 16
    )  # OpenAI's default for completions


@router.post("/chat/completions", responses=_GENERATION)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, prompts: PromptsDep, settings: SettingsDep
):
    messages = [{"role": m.role, "content": _text_content(m.content)} for m in body.messages]
    return await _serve(
        body,
        await prompts.chat(messages),
        "chat.completion",
        request,
        engine,
        settings,
        body.max_completion_tokens or body.max_tokens,
    )


def _text_content(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def _routing(model: str | None, routing: Routing | None, engine: Engine, settings: Settings) -> Routing | None:
    if model is None or model == settings.served_model_name():
        return routing
    if model in engine.model.plugged:
        return Routing(mode="pin", expert=model, allow=routing.allow if routing else None)
    raise NotFoundError(
        f"model {model!r} does not exist; serving {settings.served_model_name()!r} and experts "
        f"{list(engine.model.plugged.names)}"
    )


async def _serve(
    body: CompletionRequest | ChatCompletionRequest,
    prompt_ids: list[int],
    kind: str,
    request: Request,
    engine: Engine,
    settings: Settings,
    max_tokens: int | None,
):
    if body.n != 1:
        raise BadRequestError(f"n={body.n} is not supported; plugmoe returns one choice per request")
    job = build_request(
        engine,
        settings,
        prompt_ids,
        max_new_tokens=max_tokens,
        min_new_tokens=body.min_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop,
        routing=_routing(body.model, body.routing, engine, settings),
    )
    handle = engine.submit(job)
    model = body.model or settings.served_model_name()
    ident = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if body.stream:
        return StreamingResponse(
            _stream(handle, kind, ident, model), media_type="text/event-stream", headers=SSE_HEADERS
        )
    done = await wait_for_result(handle, request)
    choice: dict[str, Any] = {"index": 0, "finish_reason": done.reason, "logprobs": None}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": done.text}
    else:
        choice["text"] = done.text
    return {
        "id": ident,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(done),
        "plugmoe": _extras(done),
    }


def _usage(done: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def _extras(done: Finished) -> dict[str, Any]:
    return {"experts": done.shares, "routing_entropy": done.routing_entropy, "message": done.message}


async def _stream(handle: RequestHandle, kind: str, ident: str, model: str) -> AsyncIterator[str]:
    chat = kind == "chat.completion"
    created = int(time.time())
    head = {
        "id": ident,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
    }

    def chunk(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return {**head, "choices": [choice]}

    if chat:
        yield sse(chunk("", None, first=True))
    async for event in events_until_done(handle):
        if event.text:
            yield sse(chunk(event.text, None))
        if event.finished is not None:
            last = {**chunk(None, event.finished.reason), "usage": _usage(event.finished)}
            error = stream_error(event.finished)
            yield sse({**last, "plugmoe": _extras(event.finished), **({"error": error} if error else {})})
    yield sse("[DONE]")
