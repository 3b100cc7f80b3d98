"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models (each expert as vLLM lists a
LoRA adapter: `parent` the backbone, `root` its source). vLLM's /v1/load_lora_adapter: server.api.routes.lora_adapters.

`model` is the backbone's name (routing as the request's `routing` extension says, token mode by default)
or a plugged expert's name, which pins that expert. Every parameter is honoured or refused with a 400
naming it (server.openai_params holds the table, server.api.validation checks a request against it and
builds its engine requests; this module submits them and writes the responses). Each prompt x n is one
sequence in the engine's batch; choice index = prompt index * n + i, and with a seed, choice i samples with
seed + i. Responses carry a `plugmoe` field with route shares (choice 0's; each choice has its own when
there are several).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from moe.decode.sequence import Event, Finished
from server.api.deps import ClientDep, EngineDep, PromptsDep, SettingsDep
from server.api.streaming import SSE_HEADERS, merged_events, sse, stream_error, wait_for_results
from server.api.validation import OpenAIPlan, Prompt, openai_plan
from server.engine import Engine
from server.logprobs import TokenText, chat_logprobs, completion_logprobs, prompt_logprobs, trimmed
from server.requests import RequestHandle
from server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    error_responses,
    stream_response,
)
from server.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai"])
STARTED = int(time.time())
_GENERATION = {
    **stream_response("a completion (server-sent chunks with stream: true)"),
    **error_responses(400, 404, 429, 503),
}


@router.get("/models", response_model=ModelList, responses=error_responses(503))
async def list_models(engine: EngineDep, settings: SettingsDep) -> ModelList:
    """The backbone, then every plugged expert as vLLM lists a LoRA adapter: `parent` the backbone's id, `root`
    its source (a PEFT adapter's directory) or its name."""
    base = settings.served_model_name()
    cards = [ModelCard(id=base, created=STARTED, root=settings.model)]
    plugged = engine.model.plugged
    for name in plugged.names:
        provenance = plugged.get(name).metadata.get("provenance") or {}
        root = provenance.get("adapter_dir") if provenance.get("source") == "peft" else None
        cards.append(ModelCard(id=name, created=STARTED, root=root or name, parent=base, plugmoe_kind="expert"))
    return ModelList(data=cards)


@router.post("/completions", responses=_GENERATION)
async def completions(
    body: CompletionRequest,
    request: Request,
    engine: EngineDep,
    prompts: PromptsDep,
    settings: SettingsDep,
    client: ClientDep,
):
    plan = await openai_plan(body, "completions", engine, prompts, settings)
    return await _serve(
        plan, "text_completion", body.n, body.stream, request, engine, prompts.tokenizer, settings, client
    )


@router.post("/chat/completions", responses=_GENERATION)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    engine: EngineDep,
    prompts: PromptsDep,
    settings: SettingsDep,
    client: ClientDep,
):
    plan = await openai_plan(body, "chat", engine, prompts, settings)
    return await _serve(
        plan, "chat.completion", body.n, body.stream, request, engine, prompts.tokenizer, settings, client
    )


async def _serve(
    plan: OpenAIPlan,
    kind: str,
    n: int,
    stream: bool,
    request: Request,
    engine: Engine,
    tokenizer: Any,
    settings: Settings,
    client: str,
):
    handles = engine.submit_all(plan.jobs, client, settings.sequences_per_client())
    shape = _Shape(kind, plan, TokenText(tokenizer), n)
    if stream:
        return StreamingResponse(_stream(handles, shape), media_type="text/event-stream", headers=SSE_HEADERS)
    results = await wait_for_results(handles, request)
    choices = [shape.choice(index, done) for index, done in enumerate(results)]
    response = {
        "id": shape.ident,
        "object": kind,
        "created": int(time.time()),
        "model": plan.model,
        "choices": choices,
        "usage": shape.usage(results),
        "plugmoe": _extras(results[0]),
    }
    if shape.chat and plan.prompt_logprobs is not None:  # vLLM writes chat's beside the choices (one prompt)
        response["prompt_logprobs"] = shape.prompt_logprobs(results[0])
    return response


def _extras(done: Finished) -> dict[str, Any]:
    return {"experts": done.shares, "routing_entropy": done.routing_entropy, "message": done.message}


@dataclass
class _Shape:
    """How one request's choices are written, whole or streamed."""

    kind: str
    plan: OpenAIPlan
    texts: TokenText
    n: int

    def __post_init__(self) -> None:
        self.chat = self.kind == "chat.completion"
        self.ident = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.model, self.top, self.echo, self.prompts = (
            self.plan.model,
            self.plan.top,
            self.plan.echo,
            self.plan.prompts,
        )

    def prompt(self, index: int) -> Prompt:
        return self.prompts[index // self.n]

    def usage(self, results: list[Finished]) -> dict[str, int]:
        prompt_tokens = sum(len(p.ids) for p in self.prompts)  # each prompt counted once, whatever n
        completion_tokens = sum(done.completion_tokens for done in results)
        return _usage(prompt_tokens, completion_tokens)

    def prompt_logprobs(self, done: Finished) -> list[dict[str, Any] | None] | None:
        k = self.plan.prompt_logprobs
        return None if k is None else prompt_logprobs(done.prompt_logprobs or [], k, self.texts)

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
                    scored = trimmed(done.prompt_logprobs or [None] * len(prompt.ids), self.top)
                    ids, entries = prompt.ids + ids, scored + entries
                choice["logprobs"] = completion_logprobs(ids, entries, self.texts)
            if self.plan.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self.prompt_logprobs(done)
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


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _stream(handles: list[RequestHandle], shape: _Shape) -> AsyncIterator[str]:
    """Chunks per choice as its tokens come (chat: a role chunk first; echo: the prompt first), a finish chunk
    per choice, then with include_usage a last chunk with `choices: []` and the usage (other chunks carry
    `usage: null`, or with continuous_usage_stats their choice's usage so far, as vLLM writes it), then
    [DONE]."""
    plan = shape.plan
    generated = [0] * len(handles)  # tokens per choice so far

    def usage(index: int) -> dict[str, Any]:
        if plan.continuous_usage:
            return {"usage": _usage(len(shape.prompt(index).ids), generated[index])}
        return {"usage": None} if plan.include_usage else {}

    offsets = [0] * len(handles)  # completions' text_offset: characters already sent per choice
    for index in range(len(handles)):
        if shape.chat:
            yield sse({**shape.chunk(index, "", None, role="assistant"), **usage(index)})
        elif shape.echo:
            text = shape.prompt(index).text
            offsets[index] = len(text)
            yield sse({**shape.chunk(index, text, None), **usage(index)})
    results: list[Finished | None] = [None] * len(handles)
    async for index, event in merged_events(handles):
        generated[index] += len(event.token_ids)
        logprobs = shape.event_logprobs(event, offsets[index])
        if event.text or logprobs is not None:
            yield sse({**shape.chunk(index, event.text, None, logprobs), **usage(index)})
            offsets[index] += sum(len(shape.texts.text(t)) for t in event.token_ids) if logprobs else 0
        if event.finished is not None:
            results[index] = event.finished
            generated[index] = event.finished.completion_tokens
            finish = shape.chunk(index, None, event.finished.reason)
            error = stream_error(event.finished)
            extras = {"plugmoe": _extras(event.finished), **({"error": error} if error else {})}
            yield sse({**finish, **usage(index), **extras})
    if plan.include_usage:
        done = [r for r in results if r is not None]
        yield sse({**shape.chunk(0, None, None), "choices": [], "usage": shape.usage(done)})
    yield sse("[DONE]")
