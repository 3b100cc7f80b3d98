"""HTTP request bodies into engine requests: every 4xx that a request's values can earn is decided here.

    plan = await openai_plan(body, "completions", engine, prompts, settings)   # /v1/completions, chat
    job = await generate_job(body, engine, prompts, settings)                  # POST /generate

Routes only parse (pydantic: types and plain ranges, server.schemas), call one of these, submit the
GenerationRequests and format what comes back. Decided here, in this order: the OpenAI parameter table
(server.openai_params: refused, unknown, message parts), combinations of parameters, the server's caps (n,
logprobs, stop strings, --max-new-tokens, sequences per request), the model's bounds (vocabulary, context
room), routing names (404 naming `model` or `routing.expert`), the chat template's options; then the prompts
are encoded (server.prompts: 413 past --max-prompt-chars) and truncated, and each sequence becomes a
GenerationRequest. SamplingParams (moe.decode.sampling) and RoutingSpec keep their own invariants and the
engine its queue, per-client and context checks: they are called, not repeated (their errors are 400s, 429s
and 503s in server.errors).
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from moe import RoutingSpec
from moe.decode.sampling import SamplingParams
from moe.decode.sequence import GenerationRequest
from moe.decode.structured_output import GrammarSpec
from moe.decode.text_stream import TextOptions
from server.engine import Engine
from server.errors import BadRequestError, NotFoundError
from server.openai_params import (
    BY_NAME,
    MESSAGE_FIELDS,
    REFUSED_MESSAGE_FIELDS,
    REFUSED_PARTS,
    REFUSED_ROLES,
    Endpoint,
)
from server.prompts import PromptEncoder
from server.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, Routing
from server.settings import Settings

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# chat_template_kwargs are template variables only: not the template call's own arguments (parameters of
# their own, or what it returns), not the variables and functions the renderer provides (`messages`,
# `raise_exception`, ...)
_TEMPLATE_RESERVED = frozenset(
    name
    for function in (PreTrainedTokenizerBase.apply_chat_template, render_jinja_template)
    for name, parameter in inspect.signature(function).parameters.items()
    if parameter.kind is not inspect.Parameter.VAR_KEYWORD
) | {"messages", "raise_exception", "strftime_now", "namespace", "dict", "self"}

OpenAIBody = CompletionRequest | ChatCompletionRequest


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what `echo` writes before the completion


@dataclass
class OpenAIPlan:
    """One OpenAI request, checked: its prompts, one GenerationRequest per prompt x n (choice index =
    prompt index * n + i), and what the response writes."""

    prompts: list[Prompt]
    jobs: list[GenerationRequest]
    model: str  # the name the response carries
    top: int | None  # logprobs alternatives per generated token; None: no logprobs
    echo: bool
    prompt_logprobs: int | None  # vLLM's prompt_logprobs: alternatives per prompt token; None: not asked
    include_usage: bool  # stream: a last chunk with the usage
    continuous_usage: bool  # stream: usage on every chunk too


# --- the OpenAI endpoints ---------------------------------------------------------------------------------


async def openai_plan(
    body: OpenAIBody, endpoint: Endpoint, engine: Engine, prompts: PromptEncoder, settings: Settings
) -> OpenAIPlan:
    check_openai(body, endpoint, settings, engine.vocab_size)
    routing = _openai_routing(body.model, body.routing, engine, settings)
    if body.model is None or body.model == settings.served_model_name():
        check_pinned(routing, engine)
    grammar = grammar_spec(body)
    if grammar is not None:
        await asyncio.to_thread(engine.grammars.check, grammar)
    if isinstance(body, ChatCompletionRequest):
        encoded = [Prompt(await _chat_prompt(body, prompts), "")]
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            max_tokens, param = body.max_tokens, "max_tokens"
        echo, default_new_tokens = False, None
    else:
        encoded = await _completion_prompts(body.prompt, prompts, engine.vocab_size)
        max_tokens, param, echo = body.max_tokens, "max_tokens", body.echo
        default_new_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    if body.truncate_prompt_tokens is not None:
        encoded = [await _truncated(p, body.truncate_prompt_tokens, max_tokens, engine, prompts) for p in encoded]
    sequences = len(encoded) * body.n
    cap = min(settings.sequences_per_request(), settings.max_batch_size + settings.max_queue)
    if sequences > cap:
        raise BadRequestError(
            f"{len(encoded)} prompts x n={body.n} is {sequences} sequences; one request may ask for at most {cap} "
            "(--max-sequences-per-request, default half of --max-batch-size: the share that leaves others served)",
            param="prompt" if len(encoded) > 1 else "n",
        )
    top = top_logprobs(body)
    scored = [k for k in (top if echo else None, body.prompt_logprobs) if k is not None]  # prompt alternatives
    bias = logit_bias(body, engine.vocab_size)
    text = TextOptions(body.skip_special_tokens, body.spaces_between_special_tokens, body.include_stop_str_in_output)
    jobs = [
        generation_request(
            engine,
            settings,
            prompt.ids,
            max_new_tokens=max_tokens,
            default_new_tokens=default_new_tokens,
            max_tokens_param=param,
            sampling=dict(
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=body.seed + i if body.seed is not None else None,
                min_new_tokens=body.min_tokens,
                ignore_eos=body.ignore_eos,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                logit_bias=bias,
                stop_token_ids=tuple(body.stop_token_ids or ()),
                logprobs=top,
            ),
            stop=body.stop,
            routing=routing,
            prompt_logprobs=max(scored) if scored else None,
            grammar=grammar,
            text=text,
        )
        for prompt in encoded
        for i in range(body.n)
    ]
    options = body.stream_options
    return OpenAIPlan(
        prompts=encoded,
        jobs=jobs,
        model=body.model or settings.served_model_name(),
        top=top,
        echo=echo,
        prompt_logprobs=body.prompt_logprobs,
        include_usage=options is not None and options.include_usage,
        continuous_usage=options is not None and options.include_usage and options.continuous_usage_stats,
    )


def check_openai(body: OpenAIBody, endpoint: Endpoint, settings: Settings, vocab_size: int) -> None:
    """The parameter table, then the bounds that depend on the server and on parameter combinations
    (everything that needs no tokenizer)."""
    check_params(body, endpoint)
    if body.stream_options is not None and not body.stream:
        raise BadRequestError("stream_options is only allowed with stream: true", param="stream_options")
    if body.n > settings.max_n:
        raise BadRequestError(f"n={body.n} is over this server's cap of {settings.max_n} (--max-n)", param="n")
    top = top_logprobs(body)
    if top is not None and top > settings.max_logprobs:
        param = "logprobs" if endpoint == "completions" else "top_logprobs"
        raise BadRequestError(
            f"{param}={top} is over this server's cap of {settings.max_logprobs} (--max-logprobs)", param=param
        )
    if body.prompt_logprobs is not None:
        if body.prompt_logprobs > settings.max_logprobs:
            raise BadRequestError(
                f"prompt_logprobs={body.prompt_logprobs} is over this server's cap of {settings.max_logprobs} "
                "(--max-logprobs)",
                param="prompt_logprobs",
            )
        if body.stream:
            raise BadRequestError(
                "prompt_logprobs cannot be streamed (as in vLLM); use stream: false", "prompt_logprobs"
            )
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        _check_template_options(body)
    echo = isinstance(body, CompletionRequest) and body.echo
    if echo and body.stream and top is not None:
        raise BadRequestError("echo with logprobs (prompt logprobs) cannot be streamed; use stream: false", "echo")
    if body.max_tokens == 0 and not echo:
        raise BadRequestError("max_tokens must be >= 1 (0 only with echo: score the prompt)", param="max_tokens")
    if body.truncate_prompt_tokens == 0:
        raise BadRequestError(
            "truncate_prompt_tokens must be >= 1 (keep the prompt's last k tokens) or -1 (as many as fit)",
            param="truncate_prompt_tokens",
        )
    logit_bias(body, vocab_size)
    check_stop(body.stop, settings)
    for token in body.stop_token_ids or ():
        if not 0 <= token < vocab_size:
            raise BadRequestError(f"stop_token_ids: {token} is not a token id (0..{vocab_size - 1})", "stop_token_ids")
    if body.response_format is not None and body.response_format.type != "text" and body.guided_regex is not None:
        raise BadRequestError("give response_format or guided_regex, not both", param="guided_regex")


def check_stop(stop: str | list[str] | None, settings: Settings) -> None:
    """400 stating the caps for stop strings past --max-stop-strings, --max-stop-chars or --max-stop-total-chars
    (the stop check holds back and searches up to the longest stop string at every token)."""
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    caps = (
        f"this server takes at most {settings.max_stop_strings} stop strings (--max-stop-strings) of at most "
        f"{settings.max_stop_chars} characters each (--max-stop-chars), {settings.max_stop_total_chars} together "
        "(--max-stop-total-chars)"
    )
    if len(stops) > settings.max_stop_strings:
        raise BadRequestError(f"stop holds {len(stops)} strings; {caps}", param="stop")
    for i, text in enumerate(stops):
        if len(text) > settings.max_stop_chars:
            where = "stop" if isinstance(stop, str) else f"stop[{i}]"
            raise BadRequestError(f"{where} is {len(text)} characters long; {caps}", param=where)
    total = sum(len(text) for text in stops)
    if total > settings.max_stop_total_chars:
        raise BadRequestError(f"stop strings hold {total} characters together; {caps}", param="stop")


def check_params(body: OpenAIBody, endpoint: Endpoint) -> None:
    """400 naming the first parameter plugmoe cannot honour: refused, unknown, or in a refused message part."""
    for name, value in (body.model_extra or {}).items():
        param = BY_NAME.get((name, endpoint))
        if param is None:
            raise BadRequestError(
                f"unknown parameter {name!r} for /v1/{endpoint.replace('chat', 'chat/completions')}; plugmoe "
                "refuses what it cannot honour (see the README's parameter table)",
                param=name,
            )
        if param.status == "refused" and not param.neutral(value):
            raise _refuse(name, param.note)
    if isinstance(body, ChatCompletionRequest):
        for i, message in enumerate(body.messages):
            _check_message(i, message.role, message.content, message.model_extra or {})


def _refuse(param: str, why: str) -> BadRequestError:
    return BadRequestError(f"{param} is not supported by plugmoe: {why}", param=param)


def _check_message(i: int, role: str, content: Any, extra: dict[str, Any]) -> None:
    where = f"messages[{i}]"
    if role in REFUSED_ROLES:
        raise _refuse(f"{where}.role", f"role {role!r} belongs to {REFUSED_ROLES[role]}")
    for name, value in extra.items():
        if name in REFUSED_MESSAGE_FIELDS:
            if value is not None and value != []:
                raise _refuse(f"{where}.{name}", REFUSED_MESSAGE_FIELDS[name])
        elif name not in MESSAGE_FIELDS:
            raise BadRequestError(f"unknown field {name!r} in {where}", param=f"{where}.{name}")
    if isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type")
            if kind in REFUSED_PARTS:
                raise _refuse(f"{where}.content[{j}]", f"{kind} parts ({REFUSED_PARTS[kind]}); the model reads text")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise BadRequestError(
                    f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': ...}}, got type {kind!r}",
                    param=f"{where}.content[{j}]",
                )


def _check_template_options(body: ChatCompletionRequest) -> None:
    if body.continue_final_message and body.add_generation_prompt:
        raise BadRequestError(
            "continue_final_message continues the last message; it needs add_generation_prompt: false (as in vLLM)",
            param="continue_final_message",
        )
    if body.continue_final_message and body.messages[-1].role != "assistant":
        raise BadRequestError(
            f"continue_final_message continues the last message, which must be the assistant's; it is "
            f"{body.messages[-1].role!r}",
            param="continue_final_message",
        )
    taken = sorted(set(body.chat_template_kwargs or {}) & _TEMPLATE_RESERVED)
    if taken:
        raise BadRequestError(
            f"chat_template_kwargs may only hold template variables; {taken} are the template call's arguments or "
            "the renderer's own names (add_generation_prompt and continue_final_message are request parameters)",
            param=f"chat_template_kwargs.{taken[0]}",
        )


def top_logprobs(body: OpenAIBody) -> int | None:
    """How many alternatives per generated token the request asks for (None: no logprobs)."""
    if isinstance(body, CompletionRequest):
        return body.logprobs
    if not body.logprobs:
        return None
    return body.top_logprobs or 0


def logit_bias(body: OpenAIBody, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """logit_bias as (token id, bias) pairs; 400 for a key that is not a token id or a value out of range."""
    pairs: list[tuple[int, float]] = []
    for key, value in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise BadRequestError(f"logit_bias keys are token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise BadRequestError(f"logit_bias: {token} is not a token id (0..{vocab_size - 1})", param="logit_bias")
        if not -100 <= value <= 100:
            raise BadRequestError(f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
        pairs.append((token, float(value)))
    return tuple(pairs)


def grammar_spec(body: OpenAIBody) -> GrammarSpec | None:
    """The structured-output constraint the request asks for, if any."""
    if body.guided_regex is not None:
        return GrammarSpec.regex(body.guided_regex)
    form = body.response_format
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return GrammarSpec.json_object()
    if form.json_schema is None:
        raise BadRequestError(
            "response_format type json_schema needs json_schema: {name, schema}", "response_format.json_schema"
        )
    return GrammarSpec.json_schema(form.json_schema.schema_, param="response_format.json_schema.schema")


def _openai_routing(model: str | None, routing: Routing | None, engine: Engine, settings: Settings) -> Routing | None:
    """`model`: the backbone's name (the request's routing), or a plugged expert's name (pins it); else 404."""
    if model is None or model == settings.served_model_name():
        return routing
    if model in engine.model.plugged:
        return Routing(mode="pin", expert=model, allow=routing.allow if routing else None)
    raise NotFoundError(
        f"model {model!r} does not exist; serving {settings.served_model_name()!r} and experts "
        f"{list(engine.model.plugged.names)}",
        param="model",
    )


def check_pinned(routing: Routing | None, engine: Engine) -> None:
    """404 naming routing.expert when a pin names an expert that is not plugged (the engine checks again at
    submission, for an unplug in between)."""
    pinned = routing.expert if routing is not None and routing.mode == "pin" else None
    if pinned is not None and pinned not in engine.model.plugged:
        raise NotFoundError(
            f"routing.expert: no expert named {pinned!r} is plugged; plugged: "
            f"{list(engine.model.plugged.names) or 'none'}",
            param="routing.expert",
        )


async def _chat_prompt(body: ChatCompletionRequest, prompts: PromptEncoder) -> list[int]:
    messages = []
    for m in body.messages:
        message = {"role": m.role, "content": _text_content(m.content)}
        if (m.model_extra or {}).get("name") is not None:
            message["name"] = m.model_extra["name"]
        messages.append(message)
    return await prompts.chat(
        messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        template_kwargs=body.chat_template_kwargs,
    )


def _text_content(content: str | list[dict[str, Any]] | None) -> str:
    """Text content; parts were checked to be text parts (_check_message)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part["text"] for part in content)


async def _completion_prompts(prompt: Any, prompts: PromptEncoder, vocab_size: int) -> list[Prompt]:
    """str | list[str] | list[int] | list[list[int]] -> prompts (token ids are taken as they are)."""
    if isinstance(prompt, str):
        return [Prompt(await prompts.encode(prompt), prompt)]
    if not prompt:
        raise BadRequestError("prompt is empty; send a string, strings, token ids or lists of token ids", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [Prompt(await prompts.encode(p), p) for p in prompt]
    lists = [prompt] if all(isinstance(t, int) for t in prompt) else prompt
    out = []
    for i, ids in enumerate(lists):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise BadRequestError(
                f"prompt[{i}] holds ids that are not tokens (0..{vocab_size - 1}): {bad[:5]}", "prompt"
            )
        out.append(Prompt(list(ids), await prompts.decode(ids)))
    return out


async def _truncated(
    prompt: Prompt, keep: int, max_tokens: int | None, engine: Engine, prompts: PromptEncoder
) -> Prompt:
    """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (-1: as many as leave room for
    max_tokens, or one token, in the context)."""
    if keep == -1:
        keep = engine.context_limit - max(1, max_tokens or 1)
    if len(prompt.ids) <= keep:
        return prompt
    if keep < 1:
        raise BadRequestError(
            f"truncate_prompt_tokens=-1 leaves no room for the prompt: max_tokens={max_tokens} and the context "
            f"limit is {engine.context_limit}",
            param="truncate_prompt_tokens",
        )
    ids = prompt.ids[-keep:]
    return Prompt(ids, await prompts.decode(ids) if prompt.text else "")


# --- POST /generate ---------------------------------------------------------------------------------------


async def generate_job(
    body: GenerateRequest, engine: Engine, prompts: PromptEncoder, settings: Settings
) -> GenerationRequest:
    if body.logprobs is not None and body.logprobs > settings.max_logprobs:
        raise BadRequestError(
            f"logprobs={body.logprobs} is over this server's cap of {settings.max_logprobs} (--max-logprobs)",
            param="logprobs",
        )
    check_stop(body.stop, settings)
    check_pinned(body.routing, engine)
    prompt_ids = await prompts.encode(body.prompt)
    explicit = "max_new_tokens" in body.model_fields_set
    return generation_request(
        engine,
        settings,
        prompt_ids,
        max_new_tokens=body.max_new_tokens if explicit else None,
        default_new_tokens=body.max_new_tokens,
        sampling=dict(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            min_new_tokens=body.min_new_tokens,
            logprobs=body.logprobs,
        ),
        stop=body.stop,
        routing=body.routing,
    )


# --- one sequence ----------------------------------------------------------------------------------------


def generation_request(
    engine: Engine,
    settings: Settings,
    prompt_ids: list[int],
    *,
    max_new_tokens: int | None,
    default_new_tokens: int | None = None,
    max_tokens_param: str = "max_new_tokens",
    sampling: dict[str, Any] | None = None,
    stop: str | list[str] | None = None,
    routing: Routing | None = None,
    prompt_logprobs: int | None = None,
    grammar: GrammarSpec | None = None,
    text: TextOptions | None = None,
) -> GenerationRequest:
    """One sequence. sampling: SamplingParams' fields (min_new_tokens is capped at the length); raises
    SamplingParamsError / RoutingSpecError (400) from their own checks, and a 400 stating the cap for
    max_new_tokens over --max-new-tokens or over the room the context leaves, or top_k over the vocabulary.

    max_new_tokens None: default_new_tokens (or the cap), shortened to fit the context."""
    sampling = dict(sampling or {})
    top_k = sampling.get("top_k", 0)
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
    sampling["min_new_tokens"] = min(sampling.get("min_new_tokens", 0), limit)
    stops = tuple(s for s in ((stop,) if isinstance(stop, str) else stop or ()) if s)  # empty strings stop nothing
    return GenerationRequest(
        prompt_ids=prompt_ids,
        max_new_tokens=limit,
        sampling=SamplingParams(**sampling),
        stop=stops,
        routing=RoutingSpec(routing.mode, routing.expert, tuple(routing.allow) if routing.allow is not None else None),
        prompt_logprobs=prompt_logprobs,
        grammar=grammar,
        text=text or TextOptions(),
    )
