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
    prompt: str
    max_new_tokens: int = Field(64, ge=1, description="capped at the server's --max-new-tokens")
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no limit")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    routing: Routing = Routing()


class GenerateResponse(BaseModel):
    text: str
    finish_reason: str
    message: str | None = None
    usage: Usage
    experts: dict[str, float] = Field(description="each route's share of the request's (token, layer) decisions")
    routing_entropy: float


# --- OpenAI-compatible ---------------------------------------------------------------------------------


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    routing: Routing | None = Field(None, description="plugmoe extension; `model` = an expert's name pins it")


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


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
