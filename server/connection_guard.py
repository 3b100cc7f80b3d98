"""The HTTP connection layer in front of the ASGI app: uvicorn's h11 protocol with two limits it lacks.

    header deadline   a request's head (request line and headers) must be complete within --header-timeout-s
                      of the connection opening, or of the previous response ending on a kept-alive
                      connection; past it the client gets a 408 and the connection is closed. uvicorn has no
                      such timer (its keep-alive timeout stops at the first byte of the next request), so 300
                      clients sending a header byte a second held 300 connections for as long as they liked.
    connection cap    past --max-connections open connections, a new one is answered 503 (Retry-After) and
                      closed at once, before a byte of it is read: open sockets are bounded whatever the
                      clients do, and the requests already running keep being served.

Both answer with the API's error object, written as raw bytes (h11 cannot send a response before it has
parsed a request). The request body is not covered here: its size is bounded by server.middleware, and
a body that trickles in holds one connection of the cap.

`plugmoe serve` (server.cli) and each cluster replica's own port (server.cluster) run uvicorn with
`http=guarded_protocol(settings)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.settings import Settings

logger = logging.getLogger(__name__)

CAP_WARNING_EVERY_S = 10.0  # one log line per this many seconds while connections are refused at the cap


def raw_error(status: int, reason: str, message: str, kind: str, retry_after_s: int | None = None) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection, with the API's error object."""
    body = json.dumps(
        {"detail": message, "error": {"message": message, "type": kind, "param": None, "code": status}}
    ).encode()
    headers = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after_s is not None:
        headers.append(f"retry-after: {retry_after_s}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with the header deadline and the connection cap (guarded_protocol sets the two limits)."""

    header_timeout_s: float = 10.0
    max_connections: int = 512
    retry_after_s: int = 1
    _last_cap_warning = 0.0  # shared by every connection of the server: the log line is rate-limited

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # counts this connection in self.connections
        if len(self.connections) > self.max_connections:
            self._refuse_over_cap()
            return
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is parsed (or the connection failed): no deadline
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next pipelined request at once
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()  # the next request's head has the same deadline as the first one's

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.debug("closed %s: no complete request head within %g s", client, self.header_timeout_s)
        message = (
            f"the request line and headers did not arrive within {self.header_timeout_s:g} s "
            "(--header-timeout-s); the connection is closed"
        )
        self.transport.write(raw_error(408, "Request Timeout", message, "RequestTimeout"))
        self.transport.close()

    def _refuse_over_cap(self) -> None:
        now = time.monotonic()
        if now - GuardedH11Protocol._last_cap_warning >= CAP_WARNING_EVERY_S:
            GuardedH11Protocol._last_cap_warning = now
            logger.warning(
                "refusing new connections: %d are open, over --max-connections %d",
                len(self.connections) - 1,
                self.max_connections,
            )
        message = (
            f"the server has {self.max_connections} connections open, its limit (--max-connections); retry shortly"
        )
        self.transport.write(
            raw_error(503, "Service Unavailable", message, "TooManyConnections", retry_after_s=self.retry_after_s)
        )
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn.Config(http=...), with this server's limits."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "max_connections": settings.max_connections,
            "retry_after_s": settings.retry_after_s,
        },
    )
