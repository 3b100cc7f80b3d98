"""Request and response bodies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from moe import RoutingMode
from moe.adapters.expert import NAME_PATTERN
from moe.decode.sampling import MAX_REPETITION_PENALTY, MAX_SEED, MIN_REPETITION_PENALTY, MIN_TOP_P


def _unicode(text: str) -> str:
    """Text the tokenizer can encode: JSON escapes can spell lone surrogates, which are not Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds a lone surrogate at character {e.start}; send valid Unicode") from None
    return text


def _json_integer(value: Any) -> Any:
    """JSON Schema counts 1.0 as an integer: take it as 1 (strict validation then refuses 1.5 and true)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Text = Annotated[str, AfterValidator(_unicode)]
Int = Annotated[int, BeforeValidator(_json_integer)]
# how many and how long: the server's caps (--max-stop-strings ...), checked in server.api.validation so that the
# answer states them (a length bound here made a long list "Input should be a valid string")
StopStrings = Text | list[Text] | None
# an integer in [0, 2^63 - 1]; JSON true/false, "1" or 1.5 are refused, not coerced
Seed = Annotated[Int | None, Field(ge=0, le=MAX_SEED)]
ExpertName = Annotated[str, Field(pattern=f"^{NAME_PATTERN.pattern}$")]


# Request bodies are strict (no coercion: `true` is not 1, "1.5" is not 1.5, 1.5 is not an integer; 1.0 is,
# as JSON Schema says) and refuse NaN and infinity: what the schema says is what is accepted.
STRICT = ConfigDict(strict=True, allow_inf_nan=False)


class Routing(BaseModel):
    """How a request is routed: token (per token and layer), sequence (one route from the prompt), pin (one
    named expert), off (the backbone alone); allow restricts which experts may be used."""

    model_config = STRICT

    mode: RoutingMode = "token"
    expert: str | None = None
    allow: list[str] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateRequest(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")  # unknown field: 400 naming it

    prompt: Annotated[Text, Field(min_length=1)]
    max_new_tokens: Int = Field(
        64, ge=1, description="over the server's --max-new-tokens (or the context's room): 400 stating the cap"
    )
    min_new_tokens: Int = Field(0, ge=0)
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy (so is anything below 0.01)")
    top_p: float = Field(1.0, ge=MIN_TOP_P, le=1)
    top_k: Int = Field(0, ge=0, description="0: no limit; at most the vocabulary size")
    seed: Seed = None
    stop: StopStrings = None
    stream: bool = Field(False, strict=True)
    routing: Routing = Routing()
    logprobs: Int | None = Field(
        None, ge=0, description="return each generated token's logprob and this many most likely alternatives"
    )


class TopLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class GeneratedLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class GenerateResponse(BaseModel):
    text: str
    finish_reason: str
    message: str | None = None
    usage: Usage
    experts: dict[str, float] = Field(description="each route's share of the request's (token, layer) decisions")
    routing_entropy: float
    logprobs: list[GeneratedLogprob] | None = Field(None, description="per generated token, when asked")


# --- OpenAI-compatible ---------------------------------------------------------------------------------


# nested bodies are strict too: a model's config does not reach the models it contains (`"strict": 0` is no bool)
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM's: with include_usage, usage on every chunk")


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _OpenAIRequest(BaseModel):
    # unknown fields are kept so server.openai_params can refuse each by name (never silently ignored)
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str | None = None
    max_tokens: Int | None = Field(None, ge=0, description="0 only with echo: score the prompt, generate nothing")
    min_tokens: Int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0, le=2, description="below 0.01: greedy")
    top_p: float = Field(1.0, ge=MIN_TOP_P, le=1)
    top_k: Int = Field(0, ge=0, description="0: no limit; at most the vocabulary size")
    n: Int = Field(1, ge=1, description="choices per prompt, up to the server's --max-n")
    stream: bool = Field(False, strict=True)
    stop: StopStrings = None
    seed: Seed = None
    user: str | None = None
    routing: Routing | None = Field(None, description="plugmoe extension; `model` = an expert's name pins it")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    response_format: ResponseFormat | None = None
    stream_options: StreamOptions | None = None
    # plugmoe / vLLM extensions (the openai client sends them through `extra_body`)
    repetition_penalty: float = Field(
        1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, description="HF's: seen tokens' logits divided by it"
    )
    stop_token_ids: list[Int] | None = Field(None, description="token ids that end the sequence like EOS")
    guided_regex: str | None = Field(None, description="constrain the output to this regular expression")
    # vLLM's request extensions (vllm/entrypoints/openai protocol: same names, types and defaults)
    ignore_eos: bool = Field(False, description="EOS does not end the output (stop_token_ids still do)")
    skip_special_tokens: bool = Field(True, description="special tokens' text left out of the output")
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = Field(False, description="the output keeps the stop string that ended it")
    truncate_prompt_tokens: Int | None = Field(
        None, ge=-1, description="keep the prompt's last k tokens (-1: as many as the context leaves room for)"
    )
    prompt_logprobs: Int | None = Field(None, ge=0, description="each prompt token's logprob and k alternatives")


class CompletionRequest(_OpenAIRequest):
    prompt: (
        Annotated[Text, Field(min_length=1)]
        | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1)]
        | Annotated[list[Int], Field(min_length=1)]
        | Annotated[list[Annotated[list[Int], Field(min_length=1)]], Field(min_length=1)]
    ) = Field(description="a string, a list of strings, a list of token ids, or a list of token-id lists")
    logprobs: Int | None = Field(None, ge=0, description="per token: its logprob and this many most likely")
    echo: bool = False


class ChatMessage(BaseModel):
    # unknown fields are kept so server.openai_params can refuse tool calls and the like by name; content
    # parts are checked there too (text parts only, each with a string `text`)
    model_config = ConfigDict(extra="allow", strict=True)

    role: Text
    content: Text | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0)
    # vLLM's chat template extensions
    add_generation_prompt: bool = Field(True, description="end the prompt with the template's assistant turn")
    continue_final_message: bool = Field(False, description="the output continues the last message")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra variables for the chat template")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "plugmoe"
    root: str | None = Field(None, description="as vLLM: the backbone's path; an expert's source (or its name)")
    parent: str | None = Field(None, description="as vLLM: an adapter's base model id; null for the backbone")
    plugmoe_kind: Literal["backbone", "expert"] = "backbone"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- vLLM's runtime LoRA adapter API ----------------------------------------------------------------------


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's LoadLoRAAdapterRequest (other fields are ignored, as vLLM does)."""

    lora_name: str = Field("", description="the adapter's name: use it as `model`")
    lora_path: str = Field("", description="a PEFT adapter directory under --source-roots (or on --source-hosts)")
    load_inplace: bool = Field(False, description="replace an adapter already loaded under this name")


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's UnloadLoRAAdapterRequest (lora_int_id is accepted and not used)."""

    lora_name: str = Field("", description="the adapter to unload")
    lora_int_id: int | None = None


# --- experts --------------------------------------------------------------------------------------------


class DomainSample(BaseModel):
    model_config = STRICT

    texts: list[str] = Field(
        min_length=1, description="example texts of the expert's domain (the first 64 texts, 64 KiB, are kept)"
    )


class PlugFromSource(BaseModel):
    model_config = STRICT

    source: str = Field(
        description="a local path or file:// URL under --source-roots, or an http(s):// URL on --source-hosts"
    )
    name: ExpertName | None = Field(None, description="plug under this name (default: the name in the file)")
    replace: bool = False


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="the error's class, e.g. BadRequestError")
    param: str | None = Field(None, description="the offending request field, when one is")
    code: int = Field(description="the HTTP status")


class ErrorResponse(BaseModel):
    """Every error: `detail` as FastAPI writes it, `error` as OpenAI clients read it."""

    detail: str
    error: ErrorDetail


class ExpertInfo(BaseModel):
    name: str
    description: str
    examples: list[str]
    kind: str
    rank: int
    layers: list[int]
    size_bytes: int
    plugged_at: str | None
    tokens_routed: float = Field(description="(token, layer) routing decisions won since it was plugged")
    routes: bool = Field(
        True,
        description="whether it takes part in token and sequence routing; false: pin-only (a closed gate, e.g. a "
        "LoRA loaded with /v1/load_lora_adapter), served only when named as `model` or pinned",
    )
    domain_sample_texts: int = Field(0, description="texts in its domain sample (admission measures its domain on it)")
    memory_bytes: int | None = Field(
        None, description="bytes its slot takes in the expert storage: gates and weights, padded to the largest rank"
    )
    provenance: dict[str, Any] = {}
    evals: dict[str, Any] = {}
    created: str | None = None


class ClusterAnswer(BaseModel):
    """In a cluster only (absent for one process): the version committed and which replicas serve it."""

    version: int | None = Field(None, description="the expert-set version committed (cluster only)")
    converged: bool | None = Field(None, description="every live replica serves it (cluster only)")
    replicas: list[dict[str, Any]] | None = Field(None, description="each live replica's version (cluster only)")
    status: str | None = Field(None, description="with a 202: the URL that tells when every replica serves it")


class PlugResponse(ExpertInfo, ClusterAnswer):
    replaced: bool
    admission: dict[str, Any] | None = Field(None, description="the admission report (None when disabled)")


class UnplugResponse(ClusterAnswer):
    name: str
    unplugged: bool = True
    purged: bool


ERROR_DESCRIPTIONS = {
    400: "the request cannot be served as written (`error.param` names the field)",
    401: "an API key or the admin token is needed",
    403: "the key or token is wrong, or this client may not change experts",
    404: "no such expert or model",
    409: "an expert of that name is plugged (pass replace)",
    413: "the body, upload, prompt, fetched file or expert metadata is over its limit",
    422: "the expert file or source cannot be plugged (why is in the message)",
    429: "this client has its share of sequences in flight (--max-sequences-per-client; Retry-After)",
    431: "the request headers are over --max-header-bytes",
    500: "the server failed (generation failed: the error object says why)",
    503: "the model is loading, the queue is full or the server is shutting down (Retry-After)",
    507: "the expert store's disk is full; nothing was changed",
}
_EVERY_ROUTE = (401, 403, 413, 431, 500)
# a streamed response: one server-sent event per token, then one with finish_reason (and `error` on failure)
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON object, or [DONE]"}, "event": {"type": "string"}},
}


def stream_response(description: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entry for a 200 that is JSON, or server-sent events with `stream: true`."""
    return {
        200: {"description": description, "content": {"text/event-stream": {"schema": SSE_EVENT}}}
    }  # the request guard and the catch-all can answer any route


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route: these statuses and those every route can give, as ErrorResponse."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        for status in sorted({*statuses, *_EVERY_ROUTE})
    }
