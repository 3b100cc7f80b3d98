"""The ASGI layers every request passes before and after a route, outermost first (server.main stacks them):

    RequestMetrics          counts requests by route template and status, times them to the last byte
    RequestGuard            a request id, then access control and body limits before the app reads the body
    ExpertSetVersionHeader  every response names the expert-set version that answered it

RequestGuard, in order (the cluster's ingress runs it alone, server.cluster):

    1. headers over --max-header-bytes: 431 (server.connection_guard cuts a head that grows past it while
       still incomplete: 431 too, or h11's own plain 400 under --http-parser h11)
    2. auth (server.auth.refusal), the one access check: a request without the API key or admin rights it needs
       is answered 401/403 before a byte of its body is read, so a huge unauthenticated body costs nothing; an
       admitted one has its client named (server.auth.client_identity) in the scope's state for the routes
    3. Content-Length over the limit: 413 at once, nothing read
    4. the body as it streams in (chunked uploads included): counted, and 413 as soon as it passes the limit,
       so nothing is parsed or buffered beyond it

The limit is --max-upload-bytes for POST /experts (an expert file) and --max-body-bytes for everything else.
A refusal is the API's usual error object and closes the connection (the rest of the body is never read).

Every request gets an id first (the client's X-Request-Id if sane, else a new one: request_id below), kept in
the ASGI scope's state for the routes and the refusal log line (server.errors), and sent back in X-Request-Id
on every response, refusals included.
"""

from __future__ import annotations

import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import client_identity, refusal
from server.errors import HeadersTooLargeError, RequestTooLargeError, error_object, error_response, log_refusal
from server.metrics import Metrics
from server.served_experts import VERSION_HEADER
from server.settings import Settings

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")  # a client's id is taken when it looks like one


def request_id(incoming: str | None) -> str:
    """The client's id when it is sane (printable, no spaces, at most 128 characters), else a new one."""
    if incoming is not None and REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, method: str, path: str) -> tuple[int, str]:
        """(largest body in bytes, the setting that says so) for a request."""
        if method == "POST" and path == "/experts":
            return self.settings.max_upload_bytes, "--max-upload-bytes"
        return self.settings.max_body_bytes, "--max-body-bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ident = request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        scope.setdefault("state", {})["request_id"] = ident
        id_header = (REQUEST_ID_HEADER.lower().encode(), ident.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        await self._guarded(scope, receive, send_with_id)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        header_bytes = sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # "name: value\r\n"
        if header_bytes > self.settings.max_header_bytes:
            await _respond(
                scope,
                send,
                HeadersTooLargeError(
                    f"the request headers are {header_bytes} bytes, over {self.settings.max_header_bytes} "
                    "(--max-header-bytes)"
                ),
            )
            return
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        client = scope.get("client")
        client_host = client[0] if client else None
        refused = refusal(method, path, headers, client_host, self.settings)
        if refused is not None:
            await _respond(scope, send, refused)
            return
        scope["state"]["client_identity"] = client_identity(headers, client_host, self.settings)
        limit, flag = self.limit_for(method, path)

        def too_large() -> RequestTooLargeError:  # built only for a request that is refused
            return RequestTooLargeError(f"the request body is over {limit} bytes, this endpoint's limit ({flag})")

        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _respond(scope, send, too_large())
            return

        state = {"received": 0, "over": False, "started": False}

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    raise too_large()
            return message

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                if state["over"]:  # the app turned the overflow into another answer (a body parse error)
                    await _respond(scope, send, too_large())
                    state["replaced"] = True
                    return
            if state.get("replaced"):
                return
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except RequestTooLargeError:
            if state["started"]:
                raise
            await _respond(scope, send, too_large())


async def _respond(scope: Scope, send: Send, exc: Exception) -> None:
    """The error object as a complete response that closes the connection (the body is left unread)."""
    response = error_response(exc)
    response.headers["connection"] = "close"
    log_refusal(scope, response.status_code, error_object(exc))
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class ExpertSetVersionHeader:
    """Every response says which expert-set version answered it (`X-Plugmoe-Expert-Set-Version`), unless
    the route set the header itself (a plug answers with the version it committed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_version(message: Message) -> None:
            served = getattr(scope["app"].state, "experts", None) if "app" in scope else None
            if message["type"] == "http.response.start" and served is not None:
                headers = MutableHeaders(scope=message)
                if VERSION_HEADER not in headers:
                    headers[VERSION_HEADER] = str(served.version)
            await send(message)

        await self.app(scope, receive, send_with_version)


class RequestMetrics:
    """Counts requests by route template and status, and times them to the last byte (streams included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_and_watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
            if endpoint != "unmatched":
                self.metrics.request_duration.labels(endpoint=endpoint).observe(time.perf_counter() - start)
