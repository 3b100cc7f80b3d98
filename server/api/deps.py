"""What route handlers receive: the engine, the served experts, the prompt encoder, the metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.engine import Engine
from server.metrics import Metrics
from server.prompts import PromptEncoder
from server.requests import EngineStoppedError
from server.served_experts import ServedExperts


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise EngineStoppedError("the model is still loading")
    return engine


def get_experts(request: Request) -> ServedExperts:
    return request.app.state.experts


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_prompts(request: Request) -> PromptEncoder:
    prompts = getattr(request.app.state, "prompts", None)
    if prompts is None:
        raise EngineStoppedError("the model is still loading")
    return prompts


EngineDep = Annotated[Engine, Depends(get_engine)]
ExpertsDep = Annotated[ServedExperts, Depends(get_experts)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PromptsDep = Annotated[PromptEncoder, Depends(get_prompts)]
