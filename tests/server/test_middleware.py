"""server.middleware: request size limits and access control before the app reads a body.

With --api-keys a 200 MB body used to be parsed before the 401, and a 2 GB multipart upload was read whole
into memory. Now bodies are counted as they stream and refused past --max-body-bytes / --max-upload-bytes
(413, Content-Length checked first), an unauthenticated request is refused before its body is read, and
headers over --max-header-bytes are a 431. (Prompt lengths and tokenizing: tests/server/test_prompts.py.)
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import LiveServer


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == status and body["detail"] == body["error"]["message"]
    return body["error"]


def test_a_body_over_the_limit_is_413_declared_or_streamed(make_client) -> None:
    client = make_client(max_body_bytes=64 * 1024)
    declared = client.post("/generate", content=b"x" * (65 * 1024), headers={"content-type": "application/json"})
    assert "--max-body-bytes" in _error(declared, 413)["message"]
    assert declared.headers["connection"] == "close"

    consumed = {"chunks": 0}

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length, counted as it streams
        for _ in range(64):
            consumed["chunks"] += 1
            yield b" " * 4096

    streamed = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    _error(streamed, 413)
    under = client.post("/generate", json={"prompt": "fits", "max_new_tokens": 2})
    assert under.status_code == 200, under.text


def test_a_multipart_upload_over_the_limit_is_413_and_nothing_is_plugged(make_client, expert_bytes) -> None:
    client = make_client(max_upload_bytes=256 * 1024, max_body_bytes=1024)
    big = b"\0" * (300 * 1024)
    response = client.post("/experts", files={"file": ("big.safetensors", big)})
    assert "--max-upload-bytes" in _error(response, 413)["message"]
    assert client.get("/experts").json() == []
    # the upload limit, not the JSON one, applies to plugs: a real expert file (a few KB) plugs
    assert client.post("/experts", files={"file": ("ok.safetensors", expert_bytes("fits"))}).status_code == 201


# --- against a real server: bodies refused before they are read, header size ------------------------------


@pytest.fixture(scope="module")
def guarded_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(
        tiny_model_dir,
        tmp_path_factory.mktemp("guarded") / "experts",
        PLUGMOE_API_KEYS="k1",
        PLUGMOE_OPEN_PATHS="/health,/ready",  # the fixture polls /ready, as a readiness probe would
        PLUGMOE_ADMIN_TOKEN="admin",
        PLUGMOE_MAX_HEADER_BYTES="8192",
    )
    yield server
    server.stop()


def _raw_request(server: LiveServer, head: str, body: bytes = b"", wait_s: float = 10.0) -> tuple[bytes, float]:
    """Send a request head (and a first piece of body) on a raw socket; (the response, seconds to it)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait_s) as conn:
        started = time.monotonic()
        conn.sendall(head.encode("latin-1") + body)
        response = b""
        while b"\r\n\r\n" not in response or len(response) < response.find(b"\r\n\r\n") + 4 + 10:
            chunk = conn.recv(65536)
            if not chunk:
                break
            response += chunk
        return response, time.monotonic() - started


@pytest.mark.parametrize(("method", "path"), [("POST", "/generate"), ("POST", "/experts"), ("POST", "/v1/completions")])
def test_an_unauthenticated_200_mb_body_is_refused_without_being_read(
    guarded_server: LiveServer, method: str, path: str
) -> None:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {200 * 2**20}\r\n\r\n"
    )
    response, took = _raw_request(guarded_server, head, b"{" + b" " * 1000)  # 1 KB of the 200 MB promised
    assert response.startswith(b"HTTP/1.1 401"), response[:200]
    assert b'"code":401' in response and took < 5


def test_an_authenticated_body_over_the_limit_is_413_from_its_content_length(guarded_server: LiveServer) -> None:
    head = (
        "POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {200 * 2**20}\r\n\r\n"
    )
    response, took = _raw_request(guarded_server, head, b"{")
    assert response.startswith(b"HTTP/1.1 413") and b"--max-body-bytes" in response and took < 5, response[:300]


def test_headers_over_max_header_bytes_are_refused(guarded_server: LiveServer) -> None:
    head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bomb: {'a' * 9000}\r\n\r\n"
    response, _ = _raw_request(guarded_server, head)
    assert response.startswith(b"HTTP/1.1 431") and b"--max-header-bytes" in response, response[:300]
    trickled = b""  # a head that keeps growing without ending is cut at the same size (server.connection_guard)
    with socket.create_connection(("127.0.0.1", guarded_server.port), timeout=10) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            for _ in range(64):
                conn.sendall(b"X-Grow: " + b"a" * 1000 + b"\r\n")
                time.sleep(0.01)
        except OSError:
            pass  # the server closed the connection mid-head
        trickled = conn.recv(65536)
    assert trickled.startswith(b"HTTP/1.1 431") and b"--max-header-bytes" in trickled, trickled[:200]
    ok, _ = _raw_request(guarded_server, "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")
