"""What plugmoe does with each OpenAI parameter, in one table, and a request's parameters checked against it.

Every parameter of /v1/completions and /v1/chat/completions is one row of PARAMS:

    supported   it has the effect OpenAI documents (vLLM's shapes where OpenAI is silent)
    extension   plugmoe's or vLLM's own; the openai client sends it through `extra_body`
    accepted    taken, with no effect on the output by its nature (an end-user id, tags)
    refused     a 400 naming it, unless it has a value that asks for nothing (tools=[], best_of=1, ...)

A parameter in no row is refused as unknown: no parameter is ever silently ignored. The README's table is
this one, and tests/server/test_openai_params.py checks that the two agree and that each row does what it
says. Bounds that depend on the server (the token cap, n, logprobs) are checked in `check_request`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from moe.decode.structured_output import GrammarSpec
from server.errors import BadRequestError
from server.schemas import ChatCompletionRequest, CompletionRequest
from server.settings import Settings

Endpoint = Literal["completions", "chat"]
BOTH: tuple[Endpoint, ...] = ("completions", "chat")


def _none(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == ""


@dataclass(frozen=True)
class Param:
    name: str
    endpoints: tuple[Endpoint, ...]
    status: Literal["supported", "extension", "accepted", "refused"]
    note: str
    neutral: Callable[[Any], bool] = _none  # refused rows: the values that ask for nothing (accepted as such)


PARAMS: list[Param] = [
    Param("model", BOTH, "supported", "the backbone's name, or a plugged expert's name (pins it); else 404"),
    Param("prompt", ("completions",), "supported", "a string, strings, token ids, or lists of token ids"),
    Param("messages", ("chat",), "supported", "text content (a string or text parts); `name` is passed on"),
    Param("max_tokens", BOTH, "supported", "over --max-new-tokens or the context: 400 stating the cap"),
    Param("max_completion_tokens", ("chat",), "supported", "as max_tokens"),
    Param("temperature", BOTH, "supported", "default 1.0 (POST /generate: 0, greedy)"),
    Param("top_p", BOTH, "supported", "nucleus sampling"),
    Param("n", BOTH, "supported", "up to --max-n; with a seed, choice i samples with seed + i"),
    Param("stream", BOTH, "supported", "server-sent events"),
    Param("stream_options", BOTH, "supported", "include_usage: a last chunk with `choices: []` and the usage"),
    Param("stop", BOTH, "supported", "strings; the text ends before the first one"),
    Param("seed", BOTH, "supported", "same seed, same output"),
    Param("logprobs", BOTH, "supported", "completions: alternatives 0..--max-logprobs; chat: true/false"),
    Param("top_logprobs", ("chat",), "supported", "0..--max-logprobs, with logprobs: true"),
    Param("echo", ("completions",), "supported", "the prompt (and its logprobs) first; not streamed with logprobs"),
    Param("presence_penalty", BOTH, "supported", "-2..2, over generated tokens"),
    Param("frequency_penalty", BOTH, "supported", "-2..2, over generated tokens"),
    Param("logit_bias", BOTH, "supported", "token id -> -100..100, added to its logit"),
    Param("response_format", BOTH, "supported", "text, json_object, json_schema (llguidance); completions: extra_body"),
    Param("routing", BOTH, "extension", "plugmoe routing: mode token/sequence/pin/off, expert, allow-list"),
    Param("top_k", BOTH, "extension", "keep the k most likely tokens (0: all)"),
    Param("min_tokens", BOTH, "extension", "EOS and stop_token_ids blocked until this many tokens"),
    Param("repetition_penalty", BOTH, "extension", "HF's, 0.01..100, over prompt and generated tokens (1: off)"),
    Param("stop_token_ids", BOTH, "extension", "token ids that end the output like EOS"),
    Param("guided_regex", BOTH, "extension", "the output matches this regular expression"),
    Param("user", BOTH, "accepted", "an end-user id; no effect"),
    Param("metadata", ("chat",), "accepted", "tags; no effect"),
    Param("safety_identifier", ("chat",), "accepted", "an end-user id; no effect"),
    Param("prompt_cache_key", ("chat",), "accepted", "a caching hint; no effect"),
    Param(
        "best_of", ("completions",), "refused", "no server-side ranking (use n); allowed: 1", lambda v: v in (None, 1)
    ),
    Param("suffix", ("completions",), "refused", "no insertion mode; allowed: empty", _empty),
    Param("tools", ("chat",), "refused", "no tool calling; allowed: []", _empty),
    Param("tool_choice", ("chat",), "refused", "no tool calling; allowed: none", lambda v: v in (None, "none")),
    Param("parallel_tool_calls", ("chat",), "refused", "no tool calling"),
    Param("functions", ("chat",), "refused", "no function calling; allowed: []", _empty),
    Param("function_call", ("chat",), "refused", "no function calling; allowed: none", lambda v: v in (None, "none")),
    Param("audio", ("chat",), "refused", "text only"),
    Param("modalities", ("chat",), "refused", 'text only; allowed: ["text"]', lambda v: v in (None, ["text"])),
    Param("prediction", ("chat",), "refused", "no predicted outputs"),
    Param("web_search_options", ("chat",), "refused", "no web search"),
    Param("reasoning_effort", ("chat",), "refused", "not a reasoning model"),
    Param("verbosity", ("chat",), "refused", "no verbosity control"),
    Param("store", ("chat",), "refused", "completions are never stored; allowed: false", lambda v: v in (None, False)),
    Param(
        "service_tier",
        ("chat",),
        "refused",
        "one tier; allowed: auto, default",
        lambda v: v in (None, "auto", "default"),
    ),  # noqa: E501
]
BY_NAME: dict[tuple[str, Endpoint], Param] = {(p.name, e): p for p in PARAMS for e in p.endpoints}

# inside chat messages
MESSAGE_FIELDS = {"role", "content", "name"}
REFUSED_MESSAGE_FIELDS = {"tool_calls": "tool calling", "function_call": "function calling", "audio": "audio"}
REFUSED_ROLES = {"tool": "tool calling", "function": "function calling"}
REFUSED_PARTS = {"image_url": "images", "input_image": "images", "input_audio": "audio", "file": "files"}


def _refuse(param: str, why: str) -> BadRequestError:
    return BadRequestError(f"{param} is not supported by plugmoe: {why}", param=param)


def check_params(body: CompletionRequest | ChatCompletionRequest, endpoint: Endpoint) -> None:
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


def check_request(
    body: CompletionRequest | ChatCompletionRequest, endpoint: Endpoint, settings: Settings, vocab_size: int
) -> None:
    """The parameter table, then the bounds that depend on the server and on parameter combinations."""
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
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None and not body.logprobs:
        raise BadRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    echo = isinstance(body, CompletionRequest) and body.echo
    if echo and body.stream and top is not None:
        raise BadRequestError("echo with logprobs (prompt logprobs) cannot be streamed; use stream: false", "echo")
    if body.max_tokens == 0 and not echo:
        raise BadRequestError("max_tokens must be >= 1 (0 only with echo: score the prompt)", param="max_tokens")
    logit_bias(body, vocab_size)
    for token in body.stop_token_ids or ():
        if not 0 <= token < vocab_size:
            raise BadRequestError(f"stop_token_ids: {token} is not a token id (0..{vocab_size - 1})", "stop_token_ids")
    if body.response_format is not None and body.response_format.type != "text" and body.guided_regex is not None:
        raise BadRequestError("give response_format or guided_regex, not both", param="guided_regex")


def top_logprobs(body: CompletionRequest | ChatCompletionRequest) -> int | None:
    """How many alternatives per token the request asks for (None: no logprobs)."""
    if isinstance(body, CompletionRequest):
        return body.logprobs
    if not body.logprobs:
        return None
    return body.top_logprobs or 0


def logit_bias(body: CompletionRequest | ChatCompletionRequest, vocab_size: int) -> tuple[tuple[int, float], ...]:
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


def grammar_spec(body: CompletionRequest | ChatCompletionRequest) -> GrammarSpec | None:
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
