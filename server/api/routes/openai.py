"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

`model` is the backbone's name (routing as the request's `routing` extension says, token mode by default)
or a plugged expert's name, which pins that expert. Every parameter is honoured or refused with a 400
naming it (server.openai_params holds the table). Each prompt x n is one sequence in the engine's batch;
choice index = prompt index * n + i, and with a seed, choice i samples with seed + i. Responses carry a
`plugmoe` field with route shares (choice 0's; each choice has its own when there are several).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from moe.decode.sequence import Event, Finished
from server.api.deps import EngineDep, PromptsDep
from server.api.streaming import SSE_HEADERS, build_request, merged_events, sse, stream_error, wait_for_results
from server.auth import ApiKey, SettingsDep
from server.engine import Engine
from server.errors import BadRequestError, NotFoundError
from server.logprobs import TokenText, chat_logprobs, completion_logprobs
from server.openai_params import check_request, grammar_spec, logit_bias, top_logprobs
from server.prompts import PromptEncoder
from server.requests import RequestHandle
from server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    Routing,
    error_responses,
    stream_response,
)
from server.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ApiKey])
STARTED = int(time.time())
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_GENERATION = {
    **stream_response("a completion (server-sent chunks with stream: true)"),
    **error_responses(400, 404, 503),
}


@router.get("/models", response_model=ModelList, responses=error_responses(503))
async def list_models(engine: EngineDep, settings: SettingsDep) -> ModelList:
    cards = [ModelCard(id=settings.served_model_name(), created=STARTED)]
    cards += [ModelCard(id=name, created=STARTED, plugmoe_kind="expert") for name in engine.model.plugged.names]
    return ModelList(data=cards)


@dataclass
class _Prompt:
    ids: list[int]
    text: str  # what `echo` writes before the completion


@router.post("/completions", responses=_GENERATION)
async def completions(
    body: CompletionRequest, request: Request, engine: EngineDep, prompts: PromptsDep, settings: SettingsDep
):
    check_request(body, "completions", settings, engine.vocab_size)
    encoded = await _completion_prompts(body.prompt, prompts, engine.vocab_size)
    return await _serve(body, encoded, "text_completion", request, engine, prompts.tokenizer, settings)


@router.post("/chat/completions", responses=_GENERATION)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, prompts: PromptsDep, settings: SettingsDep
):
    check_request(body, "chat", settings, engine.vocab_size)
    messages = []
    for m in body.messages:
        message = {"role": m.role, "content": _text_content(m.content)}
        if (m.model_extra or {}).get("name") is not None:
            message["name"] = m.model_extra["name"]
        messages.append(message)
    encoded = [_Prompt(await prompts.chat(messages), "")]
    return await _serve(body, encoded, "chat.completion", request, engine, prompts.tokenizer, settings)


async def _completion_prompts(prompt: Any, prompts: PromptEncoder, vocab_size: int) -> list[_Prompt]:
    """str | list[str] | list[int] | list[list[int]] -> prompts (token ids are taken as they are)."""
    if isinstance(prompt, str):
        return [_Prompt(await prompts.encode(prompt), prompt)]
    if not prompt:
        raise BadRequestError("prompt is empty; send a string, strings, token ids or lists of token ids", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [_Prompt(await prompts.encode(p), p) for p in prompt]
    lists = [prompt] if all(isinstance(t, int) for t in prompt) else prompt
    out = []
    for i, ids in enumerate(lists):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise BadRequestError(
                f"prompt[{i}] holds ids that are not tokens (0..{vocab_size - 1}): {bad[:5]}", "prompt"
            )
        out.append(_Prompt(list(ids), await prompts.decode(ids)))
    return out


def _text_content(content: str | list[dict[str, Any]] | None) -> str:
    """Text content; parts were checked to be text parts (server.openai_params)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part["text"] for part in content)


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
    prompts: list[_Prompt],
    kind: str,
    request: Request,
    engine: Engine,
    tokenizer: Any,
    settings: Settings,
):
    chat = kind == "chat.completion"
    if chat and body.max_completion_tokens is not None:
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, param = body.max_tokens, "max_tokens"
    echo = not chat and body.echo
    top = top_logprobs(body)
    grammar = grammar_spec(body)
    if grammar is not None:
        await asyncio.to_thread(engine.grammars.check, grammar)
    routing = _routing(body.model, body.routing, engine, settings)
    bias = logit_bias(body, engine.vocab_size)
    jobs = [
        build_request(
            engine,
            settings,
            prompt.ids,
            max_new_tokens=max_tokens,
            min_new_tokens=body.min_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed + i if body.seed is not None else None,
            stop=body.stop,
            routing=routing,
            default_new_tokens=None if chat else COMPLETIONS_DEFAULT_MAX_TOKENS,
            max_tokens_param=param,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            logit_bias=bias,
            stop_token_ids=body.stop_token_ids,
            logprobs=top,
            prompt_logprobs=top if echo else None,
            grammar=grammar,
        )
        for prompt in prompts
        for i in range(body.n)
    ]
    capacity = settings.max_batch_size + settings.max_queue
    if len(jobs) > capacity:
        raise BadRequestError(
            f"{len(prompts)} prompts x n={body.n} is {len(jobs)} sequences; this server holds at most {capacity} "
            "(--max-batch-size + --max-queue)",
            param="prompt" if len(prompts) > 1 else "n",
        )
    handles = engine.submit_all(jobs)
    shape = _Shape(kind, body.model or settings.served_model_name(), TokenText(tokenizer), top, echo, body.n, prompts)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _stream(handles, shape, include_usage), media_type="text/event-stream", headers=SSE_HEADERS
        )
    results = await wait_for_results(handles, request)
    choices = [shape.choice(index, done) for index, done in enumerate(results)]
    return {
        "id": shape.ident,
        "object": kind,
        "created": int(time.time()),
        "model": shape.model,
        "choices": choices,
        "usage": shape.usage(results),
        "plugmoe": _extras(results[0]),
    }


def _extras(done: Finished) -> dict[str, Any]:
    return {"experts": done.shares, "routing_entropy": done.routing_entropy, "message": done.message}


@dataclass
class _Shape:
    """How one request's choices are written, whole or streamed."""

    kind: str
    model: str
    texts: TokenText
    top: int | None  # logprobs alternatives per token; None: no logprobs
    echo: bool
    n: int
    prompts: list[_Prompt]

    def __post_init__(self) -> None:
        self.chat = self.kind == "chat.completion"
        self.ident = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def prompt(self, index: int) -> _Prompt:
        return self.prompts[index // self.n]

    def usage(self, results: list[Finished]) -> dict[str, int]:
        prompt_tokens = sum(len(p.ids) for p in self.prompts)  # each prompt counted once, whatever n
        completion_tokens = sum(done.completion_tokens for done in results)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def choice(self, index: int, done: Finished) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "finish_reason": done.reason, "logprobs": None}
        prompt = self.prompt(index)
        if self.chat:
            choice["message"] = {"role": "assistant", "content": done.text}
            if self.top is not None:
                choice["logprobs"] = chat_logprobs(done.logprobs, self.texts)
        else:
            choice["text"] = (prompt.text if self.echo else "") + done.text
            if self.top is not None:
                ids, entries = done.token_ids, list(done.logprobs)
                if self.echo:
                    ids, entries = prompt.ids + ids, list(done.prompt_logprobs or [None] * len(prompt.ids)) + entries
                choice["logprobs"] = completion_logprobs(ids, entries, self.texts)
        if self.n * len(self.prompts) > 1:
            choice["plugmoe"] = _extras(done)
        return choice

    def chunk(self, index: int, text: str | None, finish: str | None, logprobs: Any = None, **delta: Any) -> dict:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
        if self.chat:
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return {
            "id": self.ident,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [choice],
        }

    def event_logprobs(self, event: Event, offset: int) -> Any:
        if self.top is None or not event.token_ids:
            return None
        if self.chat:
            return chat_logprobs(event.logprobs, self.texts)
        return completion_logprobs(event.token_ids, event.logprobs, self.texts, offset)


async def _stream(handles: list[RequestHandle], shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    """Chunks per choice as its tokens come (chat: a role chunk first; echo: the prompt first), a finish chunk
    per choice, then with include_usage a last chunk with `choices: []` and the usage (other chunks carry
    `usage: null`), then [DONE]."""
    usage_field = {"usage": None} if include_usage else {}
    offsets = [0] * len(handles)  # completions' text_offset: characters already sent per choice
    for index in range(len(handles)):
        if shape.chat:
            yield sse({**shape.chunk(index, "", None, role="assistant"), **usage_field})
        elif shape.echo:
            text = shape.prompt(index).text
            offsets[index] = len(text)
            yield sse({**shape.chunk(index, text, None), **usage_field})
    results: list[Finished | None] = [None] * len(handles)
    async for index, event in merged_events(handles):
        logprobs = shape.event_logprobs(event, offsets[index])
        if event.text or logprobs is not None:
            yield sse({**shape.chunk(index, event.text, None, logprobs), **usage_field})
            offsets[index] += sum(len(shape.texts.text(t)) for t in event.token_ids) if logprobs else 0
        if event.finished is not None:
            results[index] = event.finished
            finish = shape.chunk(index, None, event.finished.reason)
            error = stream_error(event.finished)
            extras = {"plugmoe": _extras(event.finished), **({"error": error} if error else {})}
            yield sse({**finish, **usage_field, **extras})
    if include_usage:
        done = [r for r in results if r is not None]
        usage = shape.usage(done)
        yield sse({**shape.chunk(0, None, None), "choices": [], "usage": usage})
    yield sse("[DONE]")
