"""What route handlers receive: the engine, the expert registry, the tokenizer, the metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from server.engine import Engine
from server.errors import EngineStoppedError
from server.expert_registry import ExpertRegistry
from server.metrics import Metrics


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise EngineStoppedError("the model is still loading")
    return engine


def get_registry(request: Request) -> ExpertRegistry:
    return request.app.state.registry


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_tokenizer(request: Request) -> Any:
    return request.app.state.tokenizer


EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[ExpertRegistry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
TokenizerDep = Annotated[Any, Depends(get_tokenizer)]
