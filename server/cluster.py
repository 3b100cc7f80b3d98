"""Scale-out on Ray Serve: N replicas of plugmoe's own app behave as one server with one expert set.

    plugmoe serve-cluster --num-replicas 2 --expert-store s3://bucket/experts      (server.cli)
    serve run server.cluster:app_builder num_replicas=2 expert_store=/shared/experts  (Ray's CLI, KubeRay)

Each replica is the single-process server: `server.main.create_app(Settings)` built inside the replica (Ray
Serve's late-bound ingress: nothing is pickled), run by Ray Serve with its lifespan. The lifespan loads the
model and plugs the expert store's current version before it yields, and Ray Serve sends a replica traffic
only once its initialisation (that lifespan included) is done: a replica that starts or restarts serves the
current set before it takes a request. Then every replica follows the shared store (ServedExperts.watch).

Requests reach the replicas through an ingress of their own (PlugmoeIngress, the application's HTTP entry,
no CPU reserved): it reads the request (the app's access control and body limits first, server.middleware),
hands it to a replica through a Ray Serve handle (PlugmoeReplica.forward runs it through that replica's app and
streams its ASGI messages back) and relays the answer. A replica that dies before the first byte of its answer
reached the client produced nothing: the request is sent to another replica (at most FORWARD_ATTEMPTS times;
never a plug or unplug, which may have committed). A stream whose replica dies after its first byte ends
with an error event (`data: {"error": ...}`, then `data: [DONE]` on /v1), never a silent cut.

What this module adds around the app:
- the replicas' view of each other (RayReplicaSet): the controller's RUNNING replicas, and from each replica
  actor (record_routing_stats) the expert-set version it serves. A plug through any replica waits on it
  until every live replica serves the version it committed (201), or answers 202 with /cluster/versions/N;
- /cluster/replicas, /cluster/versions/{N}, /cluster/sd (a Prometheus http_sd target list: one target per
  replica, labelled replica=<id>), /cluster/metrics (every replica's /metrics with a replica label);
- per replica, its /metrics, /health and /ready served directly on a free port (`--replica-host`; lifespan
  off: it shares the replica's model), so each replica's own metrics can be scraped and its readiness probed;
  the rest of the API is the proxy's alone (a replica port gets 404), so binding it wider exposes no API;
- check_health: liveness only (the engine thread runs); failing it makes Ray Serve replace the replica;
- optionally (--route-to-current), CurrentSetRouter: requests go only to replicas that report the newest
  expert-set version (Ray Serve's custom request router, an alpha API).

Ray is imported here only: the single-process server never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlparse

import httpx
import ray
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import is_admin_request
from server.errors import NotFoundError, error_response
from server.main import create_app
from server.middleware import RequestGuard
from server.served_experts import ServedExperts
from server.settings import ClusterSettings, Settings

logger = logging.getLogger(__name__)

DEPLOYMENT = "plugmoe"
INGRESS = "plugmoe-ingress"
FORWARD_ATTEMPTS = 4  # replicas tried for one request that produced nothing before its replica died
DIRECT_PATHS = frozenset({"/metrics", "/health", "/ready"})  # what a replica's own port serves
# the parts of an HTTP scope a replica needs to run the request (plain data: it crosses processes)
FORWARDED_SCOPE_KEYS = (
    "type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
    "headers", "client", "server",
)  # fmt: skip
REPLICA_HEADER = "X-Plugmoe-Replica"
CONTROLLER, NAMESPACE = "SERVE_CONTROLLER_ACTOR", "serve"  # ray.serve._private.constants


# --- the replicas' view of each other ---------------------------------------------------------------------


async def replica_states(app_name: str, deployment: str = DEPLOYMENT, timeout_s: float = 5.0) -> list[dict]:
    """Every RUNNING replica of the deployment (the Serve controller's list) with what it reports: replica,
    version (None when it does not answer within timeout_s), experts, url (its direct port), actor_name.
    A replica that died after the controller listed it is left out."""
    controller = ray.get_actor(CONTROLLER, namespace=NAMESPACE)
    details = await controller.get_serve_instance_details.remote()
    application = details.get("applications", {}).get(app_name)
    if application is None:
        return []
    listed = [r for r in application["deployments"][deployment]["replicas"] if r["state"] == "RUNNING"]

    async def ask(replica: dict) -> dict | None:
        base = {"replica": replica["replica_id"], "actor_name": replica["actor_name"], "version": None}
        try:
            actor = ray.get_actor(replica["actor_name"], namespace=NAMESPACE)
            stats = await asyncio.wait_for(actor.record_routing_stats.remote(), timeout_s)
        except (ray.exceptions.RayActorError, ValueError):  # gone since the controller listed it
            return None
        except Exception as e:  # alive but not answering: it counts as not serving the version yet
            return {**base, "error": f"{type(e).__name__}: {e}"}
        return {**base, **stats}

    answers = await asyncio.gather(*(ask(r) for r in listed))
    return [a for a in answers if a is not None]


class RayReplicaSet:
    """server.served_experts.ReplicaSet for the replicas of one Ray Serve deployment."""

    def __init__(self, app_name: str, deployment: str, wait_s: float) -> None:
        self.app_name, self.deployment, self.wait_s = app_name, deployment, wait_s

    async def versions(self) -> list[dict[str, Any]]:
        return await replica_states(self.app_name, self.deployment)


# --- the app of one replica -------------------------------------------------------------------------------


class ReplicaHeader:
    """Every response names the replica that answered it (X-Plugmoe-Replica)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.replica = app, replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((REPLICA_HEADER.lower().encode(), self.replica.encode()))
            await send(message)

        await self.app(scope, receive, send_with_replica)


cluster_router = APIRouter(prefix="/cluster", tags=["cluster"])


def _replicas(request: Request) -> RayReplicaSet:
    return request.app.state.replicas


@cluster_router.get("/replicas")
async def list_replicas(request: Request) -> list[dict]:
    """Every live replica and the expert-set version it serves."""
    return await _replicas(request).versions()


@cluster_router.get("/versions/{version}")
async def version_status(version: int, request: Request) -> dict:
    """Whether every live replica serves expert-set version `version` (or a newer one): a plug's status URL."""
    replicas = await _replicas(request).versions()
    converged = bool(replicas) and all((r.get("version") or 0) >= version for r in replicas)
    return {"version": version, "converged": converged, "replicas": replicas}


@cluster_router.get("/sd")
async def prometheus_targets(request: Request) -> list[dict]:
    """Prometheus http_sd_configs: one target per live replica's own port, labelled with its replica id."""
    replicas = await _replicas(request).versions()
    return [
        {"targets": [urlparse(r["url"]).netloc], "labels": {"replica": r["replica"], "deployment": DEPLOYMENT}}
        for r in replicas
        if r.get("url")
    ]


@cluster_router.get("/metrics")
async def cluster_metrics(request: Request) -> PlainTextResponse:
    """Every live replica's /metrics in one exposition, each sample with a `replica` label (for a Prometheus
    that can reach the proxy but not the replicas' own ports). Each metric keeps its HELP and TYPE lines once,
    with every replica's samples beneath them."""
    replicas = [r for r in await _replicas(request).versions() if r.get("url")]
    async with httpx.AsyncClient(timeout=10) as client:
        texts = await asyncio.gather(*(client.get(f"{r['url']}/metrics") for r in replicas), return_exceptions=True)
    families: dict[str, list[str]] = {}  # HELP name -> its HELP and TYPE lines, then every replica's samples
    for replica, answer in zip(replicas, texts, strict=True):
        if isinstance(answer, BaseException) or answer.status_code != 200:
            logger.warning("no metrics from replica %s: %s", replica["replica"], answer)
            continue
        lines: list[str] | None = None
        header = False  # this replica's HELP/TYPE lines are the first ones seen for the metric
        for line in answer.text.splitlines():
            if line.startswith("# HELP "):
                name = line.split(" ", 3)[2]
                known = name in families
                lines = families.setdefault(name, [line])
                header = not known
            elif line.startswith("#"):
                if header and lines is not None:
                    lines.append(line)
            elif line.strip() and lines is not None:
                lines.append(with_label(line, "replica", replica["replica"]))
    text = "\n".join(line for lines in families.values() for line in lines) + "\n"
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def with_label(sample: str, key: str, value: str) -> str:
    """A Prometheus text-format sample line with one more label, first."""
    escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    name_end = min((i for i in (sample.find("{"), sample.find(" ")) if i >= 0), default=len(sample))
    label = f'{key}="{escaped}"'
    if sample[name_end : name_end + 1] == "{":
        rest = sample[name_end + 1 :]
        return f"{sample[:name_end]}{{{label}{',' if not rest.startswith('}') else ''}{rest}"
    return f"{sample[:name_end]}{{{label}}}{sample[name_end:]}"


def build_replica_app(settings: Settings, cluster: ClusterSettings, app_name: str, replica: str) -> FastAPI:
    """The single-process app plus the cluster's routes, the replica header and the replica's direct port."""
    app = create_app(settings)
    app.state.replicas = RayReplicaSet(app_name, DEPLOYMENT, cluster.plug_wait_s)
    app.state.replica, app.state.replica_url = replica, None
    app.include_router(cluster_router)
    app.add_middleware(ReplicaHeader, replica=replica)
    serve_app = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with serve_app(app):
            server = await _serve_directly(app, cluster.replica_host) if cluster.replica_host else None
            try:
                yield
            finally:
                if server is not None:
                    server.should_exit = True
                    with contextlib.suppress(asyncio.TimeoutError):  # it closes with the replica anyway
                        await asyncio.wait_for(asyncio.shield(app.state.replica_server_task), 5)

    app.router.lifespan_context = lifespan
    return app


class DirectPathsOnly:
    """A replica's own port: /metrics, /health and /ready (DIRECT_PATHS); every other path is a 404 that says
    where the API is. The API goes through the proxy and the ingress, which retries and ends broken streams."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in DIRECT_PATHS:
            await self.app(scope, receive, send)
            return
        message = (
            f"a replica's own port serves {sorted(DIRECT_PATHS)} only; send {scope['path']} to the cluster's "
            "address (Ray Serve's proxy)"
        )
        await error_response(NotFoundError(message))(scope, receive, send)


async def _serve_directly(app: FastAPI, host: str) -> Any:
    """Serve `app`'s /metrics, /health and /ready on host:<free port> too (lifespan off: it shares this
    replica's model and experts), with the single-process server's protections (server.cli.run_serve): header
    limit, header deadline, connection cap, no proxy headers trusted."""
    import uvicorn

    from server.connection_guard import guarded_config

    settings: Settings = app.state.settings
    config = uvicorn.Config(
        DirectPathsOnly(app),
        host=host,
        port=0,
        lifespan="off",
        log_level="warning",
        **guarded_config(settings),  # --http-parser's protocol, with the header deadline and size and the cap
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises why it could not start
            raise RuntimeError(f"the replica's direct server on {host} stopped at start")
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    advertised = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::") else host
    app.state.replica_url = f"http://{advertised}:{port}"
    app.state.replica_server_task = task
    logger.info("replica %s also serves %s", app.state.replica, app.state.replica_url)
    return server


# --- the deployment ---------------------------------------------------------------------------------------


@serve.deployment(name=DEPLOYMENT, health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()
class PlugmoeReplica:
    """One replica: plugmoe's app built from Settings inside the replica."""

    def __init__(self, settings: dict[str, Any], cluster: dict[str, Any]) -> None:
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.app_name = context.app_name
        self.settings = Settings(**settings)
        logging.basicConfig(  # plugmoe's own loggers, in the replica's log (Ray Serve configures only its own)
            level=self.settings.log_level.upper(),
            format=f"%(asctime)s %(levelname)s replica {self.replica} %(name)s: %(message)s",
        )
        self.cluster = ClusterSettings(**cluster)
        self.api: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        self.api = build_replica_app(self.settings, self.cluster, self.app_name, self.replica)
        return self.api

    def _served(self) -> ServedExperts | None:
        return getattr(self.api.state, "experts", None) if self.api is not None else None

    def check_health(self) -> None:
        """Liveness: the engine thread runs (readiness is the start gate and the expert-set version)."""
        engine = getattr(self.api.state, "engine", None) if self.api is not None else None
        if engine is not None and not engine.alive:
            raise RuntimeError("the engine thread stopped")

    async def forward(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[Message]:
        """One HTTP request relayed by PlugmoeIngress, run through this replica's app: yields the app's ASGI
        messages as it sends them. The app sees the whole body at once, then a disconnect once the ingress
        stops reading (the client went away: a generation is cancelled as with a direct client)."""
        assert self.api is not None, "the replica's app is built before it takes requests"
        sent: asyncio.Queue[Message | None] = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def run() -> None:
            try:
                await self.api({**scope, "state": {}}, receive, sent.put)
            finally:
                sent.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while (message := await sent.get()) is not None:
                yield message
            await task  # what the app raised, if anything
        finally:
            gone.set()
            if not task.done():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(task), 5)  # it sees the disconnect and cancels
                task.cancel()

    def record_routing_stats(self) -> dict[str, Any]:
        """What this replica serves: read by other replicas (a plug's wait), tests and CurrentSetRouter."""
        served = self._served()
        return {
            "replica": self.replica,
            "version": served.version if served is not None else None,
            "store_version": served.store_version if served is not None else None,
            "experts": list(served.model.plugged.names) if served is not None else [],
            "url": self.api.state.replica_url if self.api is not None else None,
            "pid": os.getpid(),  # the replica's process (tests and operators signal it)
        }


class ReplicaDiedError(RuntimeError):
    """The replica serving a request stopped before the answer was complete."""


class ForwardToReplicas:
    """The ingress's work for one HTTP request: read it whole behind the app's own access control and body
    limits (server.middleware), run it on a replica through `replicas` (PlugmoeReplica.forward, streamed)
    and answer with what the replica's app sent. The answer's head is held until its first body byte, so a
    replica that dies before then has produced nothing the client saw: the request goes to another replica
    (FORWARD_ATTEMPTS in all), unless it is a plug or unplug (it may have committed: the client checks
    /experts and retries). A replica that dies later ends a stream with an error event, and a plain answer
    with a body shorter than its Content-Length (the client sees a broken connection)."""

    def __init__(self, replicas: DeploymentHandle, settings: Settings) -> None:
        self.replicas = replicas.options(stream=True)
        self.settings = settings

    async def answer(self, request: Request) -> Response:
        body = await self._read(request)
        if isinstance(body, Response):
            return body
        scope = {key: request.scope[key] for key in FORWARDED_SCOPE_KEYS if key in request.scope}
        retryable = not is_admin_request(scope["method"], scope["path"])
        for attempt in range(1, FORWARD_ATTEMPTS + 1):
            replies = self.replicas.forward.remote(scope, body)
            head: Message | None = None
            try:
                async for message in replies:  # to the head and the first piece of the body
                    if message["type"] == "http.response.start":
                        head = message
                    elif message["type"] == "http.response.body" and head is not None:
                        return self._relay(scope, head, message, replies)
                raise ReplicaDiedError("the replica's answer ended before its first byte")
            except (ray.exceptions.RayActorError, ReplicaDiedError) as e:
                if not retryable or attempt == FORWARD_ATTEMPTS:
                    logger.error("%s %s: its replica stopped before answering: %s", scope["method"], scope["path"], e)
                    return self._unavailable(attempt)
                logger.warning(
                    "%s %s: its replica stopped before answering (%s); retrying on another (attempt %d of %d)",
                    scope["method"],
                    scope["path"],
                    type(e).__name__,
                    attempt + 1,
                    FORWARD_ATTEMPTS,
                )
                await asyncio.sleep(0.2 * attempt)  # Ray Serve's router drops the dead replica meanwhile
        raise AssertionError("unreachable: the last attempt returns")

    async def _read(self, request: Request) -> bytes | Response:
        """The request's body, read through RequestGuard (refusals: 401/403, 413, 431 as one process answers
        them), or the guard's refusal as a response."""
        chunks: list[bytes] = []
        refusal: list[Message] = []

        async def read_body(scope: Scope, receive: Receive, send: Send) -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return

        async def keep(message: Message) -> None:
            refusal.append(message)

        await RequestGuard(read_body, self.settings)(request.scope, request.receive, keep)
        if not refusal:
            return b"".join(chunks)
        response = Response(b"".join(m.get("body", b"") for m in refusal[1:]), status_code=refusal[0]["status"])
        response.raw_headers = list(refusal[0].get("headers", []))
        return response

    def _relay(self, scope: dict[str, Any], head: Message, first: Message, replies: Any) -> Response:
        """The client's response from the replica's head and first body piece; the rest streams after it."""
        if not first.get("more_body", False):
            response = Response(first.get("body", b""), status_code=head["status"])
        else:
            response = StreamingResponse(self._rest(scope, head, first, replies), status_code=head["status"])
        response.raw_headers = list(head.get("headers", []))
        return response

    async def _rest(self, scope: dict[str, Any], head: Message, first: Message, replies: Any) -> AsyncIterator[bytes]:
        yield first.get("body", b"")
        try:
            async for message in replies:
                if message["type"] == "http.response.body":
                    yield message.get("body", b"")
                    if not message.get("more_body", False):
                        return
            raise ReplicaDiedError("the replica's answer ended before its last byte")
        except (ray.exceptions.RayActorError, ReplicaDiedError) as e:
            logger.error("%s %s: its replica stopped mid-answer: %s", scope["method"], scope["path"], e)
            content_type = dict(head.get("headers", [])).get(b"content-type", b"")
            if content_type.startswith(b"text/event-stream"):
                yield _error_events(scope["path"], "the replica serving this stream stopped mid-answer")
        finally:
            replies.cancel()  # the client went away, or the answer is over: nothing more to run

    def _unavailable(self, attempts: int) -> Response:
        detail = f"the replica serving this request stopped before it answered ({attempts} tried); retry the request"
        error = {"message": detail, "type": ReplicaDiedError.__name__, "param": None, "code": 503}
        headers = {"Retry-After": str(self.settings.retry_after_s)}
        return JSONResponse({"detail": detail, "error": error}, status_code=503, headers=headers)


def _error_events(path: str, detail: str) -> bytes:
    """A stream's last events when its replica died: the error object (then [DONE] on /v1, as OpenAI ends)."""
    error = {"message": f"{detail}; retry the request", "type": ReplicaDiedError.__name__, "param": None, "code": 503}
    events = f"data: {json.dumps({'error': error})}\n\n"
    return (events + ("data: [DONE]\n\n" if path.startswith("/v1/") else "")).encode()


@serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
class PlugmoeIngress:
    """The application's HTTP entry (no CPU reserved): every request goes to a replica (ForwardToReplicas)."""

    def __init__(self, replicas: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.forwarder = ForwardToReplicas(replicas, Settings(**settings))

    async def __call__(self, request: Request) -> Response:
        return await self.forwarder.answer(request)


class CurrentSetRouter(FIFOMixin, RequestRouter):
    """Route among the replicas that report the newest expert-set version (their routing stats, polled by
    the controller), two random choices among them; a replica without stats yet counts as current (it
    plugged the current set before it was RUNNING). If none qualifies, every replica is a candidate."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        versions = {r.replica_id: (r.routing_stats or {}).get("version") for r in candidate_replicas}
        newest = max((v for v in versions.values() if v is not None), default=None)
        current = [r for r in candidate_replicas if versions[r.replica_id] in (None, newest)] or candidate_replicas
        return [random.sample(current, k=min(2, len(current)))]


def build_application(settings: Settings, cluster: ClusterSettings) -> serve.Application:
    """The Ray Serve application: PlugmoeReplica with the cluster's replica count, resources and routing.
    Settings travel as the fields that were set (each replica fills in its own defaults)."""
    given = settings.model_dump(mode="json", exclude_unset=True)
    if settings.num_threads is None and cluster.num_cpus >= 1:
        given["num_threads"] = int(cluster.num_cpus)  # not every core of the node: the replicas share them
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cluster.num_cpus, "num_gpus": cluster.num_gpus},
        # Ray Serve queues what a replica cannot take; plugmoe's own queue and its 503 sit behind this
        "max_ongoing_requests": settings.max_batch_size + settings.max_queue,
    }
    if cluster.max_replicas is not None and cluster.max_replicas > cluster.num_replicas:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=cluster.num_replicas,
            initial_replicas=cluster.num_replicas,
            max_replicas=cluster.max_replicas,
            target_ongoing_requests=cluster.target_ongoing_requests,
        )
    else:
        options["num_replicas"] = cluster.num_replicas
    if cluster.route_to_current:
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=f"{__name__}:CurrentSetRouter",
            request_routing_stats_period_s=0.5,
            request_routing_stats_timeout_s=2,
        )
    replicas = PlugmoeReplica.options(**options).bind(given, cluster.model_dump(mode="json"))
    return PlugmoeIngress.bind(replicas, given)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For `serve run server.cluster:app_builder key=value ...` and KubeRay's serveConfigV2: each key is a
    `plugmoe serve` or `plugmoe serve-cluster` setting (num_replicas=2 expert_store=s3://...)."""
    unknown = set(args) - set(Settings.model_fields) - set(ClusterSettings.model_fields)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}: use `plugmoe serve-cluster --help`'s names")
    settings = Settings(**{k: v for k, v in args.items() if k in Settings.model_fields})
    cluster = ClusterSettings(**{k: v for k, v in args.items() if k in ClusterSettings.model_fields})
    return build_application(settings, cluster)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(settings: Settings, cluster: ClusterSettings) -> None:
    """`plugmoe serve-cluster`: join or start Ray, serve the app on settings.host:port through Ray Serve's
    proxy, and block until interrupted (then the application is deleted)."""
    ray.init(address=cluster.ray_address, include_dashboard=cluster.dashboard, log_to_driver=True)
    if cluster.ray_address is not None and not settings.expert_store:
        logger.warning(
            "the expert store is the local directory %s: replicas on other nodes do not see it; pass "
            "--expert-store s3://... (or a directory every node mounts)",
            settings.resolved_expert_store(),
        )
    serve.start(http_options={"host": settings.host, "port": settings.port})
    started = time.monotonic()
    serve.run(build_application(settings, cluster), name=cluster.app_name, route_prefix="/")
    logger.info(
        "%d replicas serve http://%s:%d (ready in %.0f s); Ctrl-C stops",
        cluster.num_replicas,
        settings.host,
        settings.port,
        time.monotonic() - started,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # a container stop or `kill`, like Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping: deleting the application %s", cluster.app_name)
    finally:
        try:
            serve.delete(cluster.app_name)
        except Exception:
            logger.exception("deleting the application %s failed", cluster.app_name)
        ray.shutdown()
