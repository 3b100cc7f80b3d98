"""What route handlers receive: the settings, the engine, the served experts, the prompt encoder, the metrics,
and who the request comes from.

Each is a read of the app's state (or of the request's, which the request guard filled: server.middleware), so
each is an `async def`: FastAPI calls it on the event loop, where a plain `def` would cost a worker-thread hop per
dependency per request. Access control is not here: the guard checks every request before a route runs.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.engine import Engine
from server.metrics import Metrics
from server.prompts import PromptEncoder
from server.requests import EngineStoppedError
from server.served_experts import ServedExperts
from server.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise EngineStoppedError("the model is still loading")
    return engine


async def get_experts(request: Request) -> ServedExperts:
    return request.app.state.experts


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_prompts(request: Request) -> PromptEncoder:
    prompts = getattr(request.app.state, "prompts", None)
    if prompts is None:
        raise EngineStoppedError("the model is still loading")
    return prompts


async def get_client(request: Request) -> str:
    """Who the request comes from (its hashed API key, else its address): named once, by the request guard
    (server.auth.client_identity), for the per-client share of sequences and the scheduler's round-robin."""
    return request.state.client_identity


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
ExpertsDep = Annotated[ServedExperts, Depends(get_experts)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PromptsDep = Annotated[PromptEncoder, Depends(get_prompts)]
ClientDep = Annotated[str, Depends(get_client)]
