"""The FastAPI app: settings, the model loaded in lifespan, routers, error mapping, the ASGI layers
(server.middleware)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from server import errors
from server.admission_policy import AdmissionPolicy
from server.api.routes import experts, generate, health, lora_adapters, openai
from server.auth import binds_loopback
from server.engine import Engine, in_passing_thread
from server.expert_sources import ExpertSources
from server.expert_store import ExpertStore
from server.metrics import Metrics
from server.middleware import ExpertSetVersionHeader, RequestGuard, RequestMetrics
from server.prompts import PromptEncoder
from server.served_experts import ServedExperts
from server.settings import DEMO_MODEL_DIR, Settings

logger = logging.getLogger(__name__)


def load_engine(settings: Settings, metrics: Metrics) -> Engine:
    """Load the backbone, wrap it, and build the engine (not started)."""
    from moe import RoutedModel, RouterConfig, load_backbone

    model_path = Path(settings.model)
    if not model_path.exists() and (model_path == DEMO_MODEL_DIR or settings.model.startswith((".", "/"))):
        raise FileNotFoundError(
            f"model directory {settings.model} does not exist: pass --model (or set PLUGMOE_MODEL) to a model "
            "directory or hub id, or build the demo model (see demo/__init__.py)"
        )
    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)
    backbone, tokenizer = load_backbone(settings.model, device=settings.device, dtype=settings.dtype)
    model = RoutedModel(backbone, RouterConfig(top_k=settings.top_k, sequence_min_share=settings.sequence_min_share))
    if settings.fuse_routing and model.device.type == "cuda":
        model.fuse_decode_routing()
    return Engine(
        model,
        tokenizer,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_prefill_tokens=settings.max_prefill_tokens,
        fair_share_ratio=settings.fair_share_ratio,
        context_limit=settings.context_limit,
        metrics=metrics,
        cuda_graphs=settings.cuda_graphs,
        compile_backend=None if settings.compile_decode == "off" else settings.compile_decode,
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    engine: Engine | None = app.state.given_engine
    if engine is None:
        engine = await in_passing_thread(load_engine, settings, metrics)
    elif engine.metrics is None:
        engine.metrics = metrics
    store = ExpertStore(settings.resolved_expert_store(), settings.expert_store_storage_options())
    served = ServedExperts(
        engine,
        store,
        AdmissionPolicy(settings),
        metrics,
        ExpertSources(settings),
        replicas=app.state.replicas,
        max_rank=settings.max_expert_rank,
        context_router=settings.router == "context",
    )
    await in_passing_thread(served.load, settings.resolved_seed_experts())
    if settings.lora_modules:
        await lora_adapters.seed_lora_modules(served, settings.lora_module_list(), settings.model)
    started_here = not engine.alive
    if started_here:
        engine.start()
    prompts = PromptEncoder(engine.tokenizer, settings.max_prompt_chars)
    app.state.engine, app.state.experts, app.state.tokenizer = engine, served, engine.tokenizer
    app.state.prompts = prompts
    logger.info(
        "serving %s with experts %s (expert-set version %d)",
        settings.served_model_name(),
        list(engine.model.plugged.names),
        served.version,
    )
    _warn_about_access(settings)
    watch = asyncio.create_task(served.watch(settings.poll_interval_s)) if settings.poll_interval_s > 0 else None
    try:
        yield
    finally:
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if started_here:
            await asyncio.to_thread(engine.stop)
        served.close()
        prompts.close()
        app.state.engine = None


def _warn_about_access(settings: Settings) -> None:
    """Say at start what a deployment must know about who can reach the admin endpoints."""
    if settings.admin_token:
        return
    if not binds_loopback(settings.host):
        logger.warning(
            "listening on %s without --admin-token: plugging and unplugging experts is refused to every client "
            "(set --admin-token to allow it)",
            settings.host,
        )
    else:
        logger.info(
            "no --admin-token: direct loopback clients may plug and unplug experts; requests through a proxy "
            "(forwarded headers) are refused"
        )


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The app; the model loads in lifespan (or `engine` is used as given, for tests)."""
    settings = settings or Settings()
    app = FastAPI(title="plugmoe", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.given_engine = engine
    app.state.engine = None
    app.state.experts = None
    app.state.replicas = None  # a cluster's replicas (server.cluster sets it before the lifespan runs)
    errors.install(app)
    for module in (health, generate, openai, lora_adapters, experts):
        app.include_router(module.router)
    app.add_middleware(ExpertSetVersionHeader)
    app.add_middleware(RequestGuard, settings=settings)  # inside RequestMetrics, so its refusals are counted
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    return app
