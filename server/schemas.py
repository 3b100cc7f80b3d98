"""Request and response bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moe import RoutingMode


class Routing(BaseModel):
    """How a request is routed: token (per token and layer), sequence (one route from the prompt), pin (one
    named expert), off (the backbone alone); allow restricts which experts may be used."""

    mode: RoutingMode = "token"
    expert: str | None = None
    allow: list[str] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it, never ignored

    prompt: str
    max_new_tokens: int = Field(
        64, ge=1, description="over the server's --max-new-tokens (or the context's room): 400 stating the cap"
    )
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no limit")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    routing: Routing = Routing()
    logprobs: int | None = Field(
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _OpenAIRequest(BaseModel):
    # unknown fields are kept so server.openai_params can refuse each by name (never silently ignored)
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo: score the prompt, generate nothing")
    min_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    routing: Routing | None = Field(None, description="plugmoe extension; `model` = an expert's name pins it")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    response_format: ResponseFormat | None = None
    stream_options: StreamOptions | None = None
    # plugmoe / vLLM extensions (the openai client sends them through `extra_body`)
    repetition_penalty: float = Field(1.0, gt=0, description="HF's: seen tokens' logits divided by it")
    stop_token_ids: list[int] | None = Field(None, description="token ids that end the sequence like EOS")
    guided_regex: str | None = Field(None, description="constrain the output to this regular expression")


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists"
    )
    logprobs: int | None = Field(None, ge=0, description="per token: its logprob and this many most likely")
    echo: bool = False


class ChatMessage(BaseModel):
    # unknown fields are kept so server.openai_params can refuse tool calls and the like by name
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "plugmoe"
    plugmoe_kind: Literal["backbone", "expert"] = "backbone"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- experts --------------------------------------------------------------------------------------------


class PlugFromSource(BaseModel):
    source: str = Field(description="a local path, file:// or http(s):// URL of an expert file")
    name: str | None = None
    replace: bool = False


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
    provenance: dict[str, Any] = {}
    evals: dict[str, Any] = {}
    created: str | None = None


class PlugResponse(ExpertInfo):
    replaced: bool
    admission: dict[str, Any] | None = Field(None, description="the admission report (None when disabled)")


class UnplugResponse(BaseModel):
    name: str
    unplugged: bool = True
    purged: bool
