"""Issue 24, finding 6: no header read timeout (300 connections sending headers at 1 byte/s stayed open 45 s+)
and no connection cap. Now a request head must arrive within --header-timeout-s (408, closed) and past
--max-connections a new connection gets 503 at once (server.connection_guard), with either --http-parser
(httptools, the default, and h11); a head that grows past --max-header-bytes is closed (431 under httptools,
which has no limit of its own; h11's own 400)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from server.cli import main
from server.connection_guard import (
    GuardedH11Protocol,
    GuardedHttpToolsProtocol,
    guarded_config,
)
from server.settings import Settings
from tests.server.conftest import LiveServer, free_port

GET = b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def _app(scope, receive, send) -> None:
    """200 "ok"; /slow answers after 1.5 s (longer than the tests' header deadline)."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(1.5)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


class _Server:
    """uvicorn with the guarded protocol on a free port, in a thread."""

    def __init__(self, **limits: float | str) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            _app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            **guarded_config(Settings(**limits)),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(params=["httptools", "h11"])
def server(request: pytest.FixtureRequest) -> Iterator[_Server]:
    running = _Server(header_timeout_s=0.5, max_connections=8, max_header_bytes=2048, http_parser=request.param)
    running.parser = request.param
    yield running
    running.stop()


def _read_all(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def _get(server: _Server, path: str = "/ok") -> bytes:
    with server.connect() as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return _read_all(conn)


def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_deadline(server: _Server) -> None:
    with server.connect() as conn:
        started = time.monotonic()
        answer = b""
        for byte in GET[:-2]:  # never finishes the head
            try:
                conn.sendall(bytes([byte]))
            except OSError:  # the server closed the connection
                break
            conn.settimeout(0.1)
            try:
                answer += conn.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        conn.settimeout(10)
        answer += _read_all(conn)
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"--header-timeout-s" in answer and b'"code": 408' in answer
    assert 0.4 < took < 3, took


def test_a_complete_head_is_not_timed_afterwards(server: _Server) -> None:
    """The deadline covers the head only: a response that takes longer than it is served in full."""
    assert _get(server, "/slow").startswith(b"HTTP/1.1 200")


def test_the_next_head_on_a_kept_alive_connection_has_the_same_deadline(server: _Server) -> None:
    with server.connect() as conn:
        conn.sendall(GET)
        first = conn.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        conn.sendall(b"GET /ok HTTP/1.1\r\n")  # the second head never ends
        second = _read_all(conn)
    assert second.startswith(b"HTTP/1.1 408"), second[:200]


def test_past_the_connection_cap_a_new_connection_gets_503_at_once(server: _Server) -> None:
    idle = [server.connect() for _ in range(8)]  # the cap: 8 open connections, silent
    try:
        time.sleep(0.1)
        with server.connect() as over:
            started = time.monotonic()
            answer = _read_all(over)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b"retry-after: 1" in answer.lower() and b"--max-connections" in answer
        assert time.monotonic() - started < 0.4, "refused before the header deadline, without reading"
    finally:
        for conn in idle:
            conn.close()
    time.sleep(0.2)
    assert _get(server).startswith(b"HTTP/1.1 200"), "served again once connections closed"


def test_a_head_that_grows_past_max_header_bytes_is_closed(server: _Server) -> None:
    with server.connect() as conn:
        conn.sendall(b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            for _ in range(8):  # 8 KB of headers, the limit 2 KB, the head never ends
                conn.sendall(b"X-Grow: " + b"a" * 1000 + b"\r\n")
                time.sleep(0.02)
        except OSError:
            pass  # the server closed the connection mid-head
        answer = _read_all(conn)
    if server.parser == "h11":  # h11's own limit (h11_max_incomplete_event_size), its plain 400
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        return
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"--max-header-bytes" in answer and b'"code": 431' in answer


def test_a_head_under_max_header_bytes_in_many_pieces_is_served(server: _Server) -> None:
    """The bytes counted are the head's: a kept-alive connection's second head starts from zero."""
    with server.connect() as conn:
        for _ in range(3):  # 3 heads of ~1.6 KB each on one connection: 4.8 KB in all, each under 2 KB
            head = GET[:-2] + b"X-Pad: " + b"a" * 1500 + b"\r\n\r\n"
            for start in range(0, len(head), 100):
                conn.sendall(head[start : start + 100])
                time.sleep(0.001)
            answer = conn.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_settings_bound_the_limits() -> None:
    with pytest.raises(ValueError):
        Settings(header_timeout_s=0)
    with pytest.raises(ValueError):
        Settings(max_connections=0)


def test_serve_runs_uvicorn_with_the_guarded_protocol(monkeypatch: pytest.MonkeyPatch, tiny_model_dir) -> None:
    seen: list[uvicorn.Config] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.append(self.config))
    argv = ["serve", "--model", str(tiny_model_dir), "--header-timeout-s", "3", "--max-connections", "7"]
    assert main(argv) == 0
    assert main([*argv, "--http-parser", "h11"]) == 0
    default, h11 = seen
    assert issubclass(default.http, GuardedHttpToolsProtocol)
    assert issubclass(h11.http, GuardedH11Protocol)
    for config in (default, h11):
        assert (config.http.header_timeout_s, config.http.max_connections) == (3, 7)
        assert config.http.max_header_bytes == 16384 and not config.proxy_headers


def test_300_slow_header_connections_are_closed_and_others_served(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The review's case against `python -m server`: 300 connections sending a header byte a second."""
    server = LiveServer(tiny_model_dir, tmp_path / "experts", PLUGMOE_HEADER_TIMEOUT_S="2")
    slow: list[socket.socket] = []
    try:
        for _ in range(300):
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            conn.sendall(b"G")
            slow.append(conn)
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as ok:
            ok.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert _read_all(ok).startswith(b"HTTP/1.1 200"), "a normal client is served meanwhile"
        closed = 0
        for conn in slow:
            conn.settimeout(max(0.1, 10 - (time.monotonic() - started)))
            try:
                conn.sendall(b"E")  # still trickling
                closed += _read_all(conn).startswith(b"HTTP/1.1 408")
            except OSError:
                closed += 1  # reset by the server
        assert closed == 300
        assert time.monotonic() - started < 10, "closed at the 2 s deadline, not held open"
    finally:
        for conn in slow:
            conn.close()
        server.stop()
