"""What plugmoe does with each OpenAI parameter, in one table, and a request's parameters checked against it.

Every parameter of /v1/completions and /v1/chat/completions is one row of PARAMS:

    supported   it has the effect OpenAI documents (vLLM's shapes where OpenAI is silent)
    extension   plugmoe's or vLLM's own; the openai client sends it through `extra_body`
    accepted    taken, with no effect on the output by its nature (an end-user id, tags)
    refused     a 400 naming it, unless it has a value that asks for nothing (tools=[], best_of=1, ...)

A parameter in no row is refused as unknown: no parameter is ever silently ignored. The README's table is
this one, and tests/server/test_openai_params.py checks that the two agree and that each row does what it
says. A request is checked against it, and against the bounds that depend on the server (the token cap, n,
logprobs), in server.api.validation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

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
    Param(
        "stream_options",
        BOTH,
        "supported",
        "include_usage: a last chunk with `choices: []` and the usage; with it, vLLM's continuous_usage_stats: "
        "usage on every chunk",
    ),
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
    Param("ignore_eos", BOTH, "extension", "EOS never ends the output (blocked); stop_token_ids and stop still do"),
    Param("skip_special_tokens", BOTH, "extension", "default true; false: special tokens' text in the output"),
    Param(
        "spaces_between_special_tokens",
        BOTH,
        "extension",
        "default true; passed to the tokenizer's decode (fast tokenizers, the demo's, add no spaces either way)",
    ),
    Param(
        "include_stop_str_in_output", BOTH, "extension", "the output keeps the stop string (or EOS text) that ended it"
    ),
    Param("truncate_prompt_tokens", BOTH, "extension", "keep the prompt's last k tokens; -1: as many as fit"),
    Param("prompt_logprobs", BOTH, "extension", "each prompt token's logprob, rank and k alternatives (vLLM's shape)"),
    Param("add_generation_prompt", ("chat",), "extension", "default true: the template opens the assistant's turn"),
    Param("continue_final_message", ("chat",), "extension", "the output continues the last (assistant) message"),
    Param("chat_template_kwargs", ("chat",), "extension", "extra chat template variables (not its call's arguments)"),
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
