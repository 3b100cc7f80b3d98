"""The ASGI layer in front of every route: access control and body limits, before the app reads the body.

    1. headers over --max-header-bytes: 431 (uvicorn's h11 also refuses a head that grows past it while
       still incomplete, with a plain 400)
    2. auth (server.auth.refusal): a request without the API key or admin rights it needs is answered 401/403
       before a byte of its body is read, so a huge unauthenticated body costs nothing
    3. Content-Length over the limit: 413 at once, nothing read
    4. the body as it streams in (chunked uploads included): counted, and 413 as soon as it passes the limit,
       so nothing is parsed or buffered beyond it

The limit is --max-upload-bytes for POST /experts (an expert file) and --max-body-bytes for everything else.
A refusal is the API's usual error object and closes the connection (the rest of the body is never read).

Every request gets an id first (the client's X-Request-Id if sane, else a new one: server.errors.request_id),
kept in the ASGI scope's state for the routes and the refusal log line, and sent back in X-Request-Id on
every response, refusals included.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import refusal
from server.errors import (
    REQUEST_ID_HEADER,
    HeadersTooLargeError,
    RequestTooLargeError,
    error_object,
    error_response,
    log_refusal,
    request_id,
)
from server.settings import Settings


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
        refused = refusal(method, path, headers, client[0] if client else None, self.settings)
        if refused is not None:
            await _respond(scope, send, refused)
            return
        limit, flag = self.limit_for(method, path)
        too_large = RequestTooLargeError(f"the request body is over {limit} bytes, this endpoint's limit ({flag})")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _respond(scope, send, too_large)
            return

        state = {"received": 0, "over": False, "started": False}

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    raise too_large
            return message

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                if state["over"]:  # the app turned the overflow into another answer (a body parse error)
                    await _respond(scope, send, too_large)
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
            await _respond(scope, send, too_large)


async def _respond(scope: Scope, send: Send, exc: Exception) -> None:
    """The error object as a complete response that closes the connection (the body is left unread)."""
    response = error_response(exc)
    response.headers["connection"] = "close"
    log_refusal(scope, response.status_code, error_object(exc))
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
