"""The HTTP connection layer in front of the ASGI app: uvicorn's HTTP protocol with three limits it lacks.

    header deadline   a request's head (request line and headers) must be complete within --header-timeout-s
                      of the connection opening, or of the previous response ending on a kept-alive
                      connection; past it the client gets a 408 and the connection is closed. uvicorn has no
                      such timer (its keep-alive timeout stops at the first byte of the next request), so 300
                      clients sending a header byte a second held 300 connections for as long as they liked.
    connection cap    past --max-connections open connections, a new one is answered 503 (Retry-After) and
                      closed at once, before a byte of it is read: open sockets are bounded whatever the
                      clients do, and the requests already running keep being served.
    header size       a head still incomplete past --max-header-bytes is answered 431 and closed (a complete
                      head over it is refused by server.middleware's RequestGuard, with the same 431).

All three answer with the API's error object, written as raw bytes (neither parser can send a response before it
has parsed a request). The request body is not covered here: its size is bounded by server.middleware, and
a body that trickles in holds one connection of the cap.

Two parsers, --http-parser: httptools (llhttp, in C; the default, as uvicorn[standard] and vLLM's server run it) and
h11 (pure Python). Each streamed token is one ASGI send, which the protocol frames and writes on the event loop's
thread while it holds the GIL the engine thread waits for: h11 frames in Python, httptools' protocol in a few
lines: `python bench/http_parser.py` measures each per streamed chunk, and `python bench/peer.py --h11` serves
routing off through both (the README has the figures).

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
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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


class ConnectionGuard:
    """The limits, over either uvicorn protocol (mixed in before it): the cap at connection_made, the head's deadline
    armed then and when a response ends while the next head is awaited (`_awaiting_head`, the protocol class's),
    disarmed when the connection closes."""

    header_timeout_s: float = 10.0
    max_connections: int = 512
    max_header_bytes: int = 16384
    retry_after_s: int = 1
    _last_cap_warning = 0.0  # shared by every connection of the server: the log line is rate-limited
    _head_deadline: asyncio.TimerHandle | None = None  # armed while a request head is awaited

    # set by the uvicorn protocol
    connections: set
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    client: tuple[str, int] | None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]  # the protocol's: counts it in self.connections
        if len(self.connections) > self.max_connections:
            self._refuse_over_cap()
            return
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]  # may start a pipelined request at once
        if not self.transport.is_closing() and self._awaiting_head():
            self._arm_head_deadline()  # the next request's head has the same deadline as the first one's

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)  # type: ignore[misc]

    def _awaiting_head(self) -> bool:
        raise NotImplementedError

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or not self._awaiting_head():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.debug("closed %s: no complete request head within %g s", client, self.header_timeout_s)
        message = (
            f"the request line and headers did not arrive within {self.header_timeout_s:g} s "
            "(--header-timeout-s); the connection is closed"
        )
        self.transport.write(raw_error(408, "Request Timeout", message, "RequestTimeout"))
        self.transport.close()

    def _head_too_large(self, received: int) -> None:
        self._disarm_head_deadline()
        message = (
            f"the request head is over {self.max_header_bytes} bytes ({received} received without its end) "
            "(--max-header-bytes); the connection is closed"
        )
        self.transport.write(raw_error(431, "Request Header Fields Too Large", message, "HeadersTooLargeError"))
        self.transport.close()

    def _refuse_over_cap(self) -> None:
        now = time.monotonic()
        if now - ConnectionGuard._last_cap_warning >= CAP_WARNING_EVERY_S:
            ConnectionGuard._last_cap_warning = now
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


class GuardedHttpToolsProtocol(ConnectionGuard, HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits. llhttp has no header size limit of its own: the bytes of a
    head are counted here until it completes (a chunk that holds the end of one message and the start of a
    pipelined head is not counted: the next chunk is, and the complete head is measured by RequestGuard)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_pending, self._head_bytes = True, 0  # a head is awaited from the first byte
        super().connection_made(transport)

    def _awaiting_head(self) -> bool:
        return self._head_pending

    def data_received(self, data: bytes) -> None:
        counted = self._head_pending
        if counted:
            self._head_bytes += len(data)
        super().data_received(data)
        if (
            counted
            and self._head_pending
            and self._head_bytes > self.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._head_too_large(self._head_bytes)

    def on_headers_complete(self) -> None:
        self._head_pending, self._head_bytes = False, 0
        self._disarm_head_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head_pending = True  # what follows on this connection is the next request's head
        super().on_message_complete()


class GuardedH11Protocol(ConnectionGuard, H11Protocol):
    """uvicorn's h11 protocol with the limits; h11 itself refuses a head that grows past --max-header-bytes
    (h11_max_incomplete_event_size, set by guarded_config), with a plain 400."""

    def _awaiting_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._awaiting_head():  # the head is parsed (or the connection failed): no deadline
            self._disarm_head_deadline()


PROTOCOLS: dict[str, type[ConnectionGuard]] = {"httptools": GuardedHttpToolsProtocol, "h11": GuardedH11Protocol}


def guarded_protocol(settings: Settings) -> type[ConnectionGuard]:
    """The protocol class for uvicorn.Config(http=...): --http-parser's, with this server's limits."""
    base = PROTOCOLS[settings.http_parser]
    return type(
        base.__name__,
        (base,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "max_connections": settings.max_connections,
            "max_header_bytes": settings.max_header_bytes,
            "retry_after_s": settings.retry_after_s,
        },
    )


def guarded_config(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config's connection arguments for this server: the guarded protocol, h11's own head limit (used
    when --http-parser h11), and no proxy headers trusted (the client is the socket's peer: a header cannot make a
    remote client loopback)."""
    return {
        "http": guarded_protocol(settings),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "proxy_headers": False,
    }
