"""POST /generate: plugmoe's own generation endpoint, with routing and per-route shares."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from moe.decode.sequence import Finished
from server.api.deps import ClientDep, EngineDep, PromptsDep, SettingsDep
from server.api.streaming import SSE_HEADERS, events_until_done, sse, stream_error, wait_for_result
from server.api.validation import generate_job
from server.logprobs import TokenText, generate_logprobs
from server.requests import RequestHandle
from server.schemas import GenerateRequest, GenerateResponse, Usage, error_responses, stream_response

router = APIRouter(tags=["generate"])


def _response(done: Finished, texts: TokenText | None) -> GenerateResponse:
    return GenerateResponse(
        text=done.text,
        finish_reason=done.reason,
        message=done.message,
        usage=Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens),
        experts=done.shares,
        routing_entropy=done.routing_entropy,
        logprobs=generate_logprobs(done.logprobs, texts) if texts is not None else None,
    )


_RESPONSES = {
    **stream_response("the generation (server-sent events with stream: true)"),
    **error_responses(400, 404, 429, 503),
}


@router.post("/generate", response_model=GenerateResponse, responses=_RESPONSES)
async def generate(
    body: GenerateRequest,
    request: Request,
    engine: EngineDep,
    prompts: PromptsDep,
    settings: SettingsDep,
    client: ClientDep,
):
    """A failed generation is a 500 (503 while shutting down) with the error object; a stream's last event
    then carries `error` and finish_reason "error"."""
    job = await generate_job(body, engine, prompts, settings)
    handle = engine.submit_all([job], client, settings.sequences_per_client())[0]
    texts = TokenText(prompts.tokenizer) if body.logprobs is not None else None
    if body.stream:
        return StreamingResponse(_stream(handle, texts), media_type="text/event-stream", headers=SSE_HEADERS)
    return _response(await wait_for_result(handle, request), texts)


async def _stream(handle: RequestHandle, texts: TokenText | None) -> AsyncIterator[str]:
    """One event per token ({"text", "token_ids"}, and "logprobs" when asked), then one with finish_reason,
    usage and shares."""
    async for event in events_until_done(handle):
        if event.text or event.token_ids:
            data = {"text": event.text, "token_ids": event.token_ids}
            if texts is not None:
                data["logprobs"] = generate_logprobs(event.logprobs, texts)
            yield sse(data)
        if event.finished is not None:
            last = _response(event.finished, texts).model_dump(exclude={"logprobs"} if texts is None else set())
            error = stream_error(event.finished)
            yield sse({**last, "error": error} if error else last)
