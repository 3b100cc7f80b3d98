"""Expert sources (server/expert_sources.py): what an admin plug `source` may read.

A local source must be a regular file under --source-roots (opened non-blocking, checked with fstat; FIFOs,
devices and directories are refused at once), a URL must be on --source-hosts at every redirect, the fetch has
one deadline and one size cap (413), and a refused source gets the same answer whatever is or is not there (no
probing for paths or open ports)."""

from __future__ import annotations

import asyncio
import functools
import getpass
import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.errors import ExpertSourceError
from server.expert_sources import ExpertSources
from server.settings import Settings


def _plug(client: TestClient, source: str, **extra) -> object:
    return client.post("/experts", json={"source": source, **extra})


def _refusal(response) -> str:
    assert response.status_code == 422, response.text
    return response.json()["detail"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "allowed"
    path.mkdir()
    return path


@pytest.fixture
def client(make_client, root: Path) -> TestClient:
    return make_client(source_roots=str(root), max_upload_bytes=1 << 20, source_timeout_s=2)


def test_without_source_roots_no_local_file_is_read(make_client, expert_bytes, tmp_path: Path) -> None:
    closed = make_client()
    real = tmp_path / "real.safetensors"
    real.write_bytes(expert_bytes("real"))
    for source in (str(real), real.as_uri(), "/etc/passwd", "/dev/zero", "/nope/missing.safetensors"):
        message = _refusal(_plug(closed, source))
        assert "--source-roots" in message and "not allowed" in message
    assert closed.get("/experts").json() == []


def test_a_file_under_a_root_plugs(client: TestClient, root: Path, expert_bytes) -> None:
    (root / "sub").mkdir()
    (root / "sub" / "ok.safetensors").write_bytes(expert_bytes("ok"))
    (root / "link.safetensors").symlink_to(root / "sub" / "ok.safetensors")  # a symlink inside a root is fine
    assert _plug(client, str(root / "sub" / "ok.safetensors")).status_code == 201
    assert _plug(client, (root / "link.safetensors").as_uri(), name="viaurl").status_code == 201
    assert _plug(client, str(root / "sub" / ".." / "sub" / "ok.safetensors"), name="dots").status_code == 201


def test_outside_the_roots_every_path_gets_the_same_answer(client: TestClient, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"exists")
    (root / "escape.safetensors").symlink_to(outside)  # inside by name, outside once resolved
    sources = {
        "existing file": str(outside),
        "missing file": str(tmp_path / "missing.safetensors"),
        "traversal": str(root / ".." / "secret.safetensors"),
        "symlink out": str(root / "escape.safetensors"),
        "directory": str(tmp_path),
        "device": "/dev/zero",
        "proc": "/proc/self/environ",
    }
    answers = {
        case: _refusal(_plug(client, source)).replace(repr(source), "<source>") for case, source in sources.items()
    }
    assert len(set(answers.values())) == 1, answers  # nothing tells whether a path exists
    assert "not allowed" in answers["existing file"]


def test_fifos_devices_and_directories_under_a_root_are_refused_at_once(client: TestClient, root: Path) -> None:
    fifos = [root / f"pipe{i}.safetensors" for i in range(8)]  # more than the thread pool the review exhausted
    for fifo in fifos:
        os.mkfifo(fifo)
    (root / "zero.safetensors").symlink_to("/dev/zero")  # resolves to /dev: outside the root
    (root / "dir.safetensors").mkdir()
    started = time.monotonic()
    for fifo in fifos:
        assert "not a regular file" in _refusal(_plug(client, str(fifo)))
    assert "not allowed" in _refusal(_plug(client, str(root / "zero.safetensors")))
    assert "not a regular file" in _refusal(_plug(client, str(root / "dir.safetensors")))
    assert time.monotonic() - started < 10, "nothing waited for a writer"
    assert client.get("/health").status_code == 200


def test_a_device_under_an_allowed_root_is_refused(make_client) -> None:
    client = make_client(source_roots="/dev")
    assert "not a regular file" in _refusal(_plug(client, "/dev/zero"))


def test_a_local_file_over_the_size_cap_is_413(client: TestClient, root: Path) -> None:
    (root / "big.safetensors").write_bytes(b"\0" * ((1 << 20) + 1))
    response = _plug(client, str(root / "big.safetensors"))
    assert response.status_code == 413 and response.json()["error"]["param"] == "source"


def test_a_missing_file_under_a_root_says_so(client: TestClient, root: Path) -> None:
    assert "no file" in _refusal(_plug(client, str(root / "missing.safetensors")))


# --- http(s) -------------------------------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files, plus /redirect?to=URL, /trickle (a byte every 0.5 s) and /huge (claims 1 GB)."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.end_headers()
        elif self.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass  # the client gave up, as it should
        elif self.path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
        else:
            super().do_GET()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    files = tmp_path / "web"
    files.mkdir()
    handler = functools.partial(_Handler, directory=str(files))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", files
    server.shutdown()
    server.server_close()


def test_without_source_hosts_no_url_is_fetched(make_client, web: tuple[str, Path], expert_bytes) -> None:
    host, files = web
    (files / "web.safetensors").write_bytes(expert_bytes("web"))
    message = _refusal(_plug(make_client(), f"http://{host}/web.safetensors"))
    assert "--source-hosts" in message and "not allowed" in message


def test_a_url_on_an_allowed_host_plugs_and_redirects_stay_on_the_list(
    make_client, web: tuple[str, Path], expert_bytes
) -> None:
    host, files = web
    (files / "web.safetensors").write_bytes(expert_bytes("web"))
    client = make_client(source_hosts=host, source_timeout_s=5)
    assert _plug(client, f"http://{host}/web.safetensors").status_code == 201
    inside = f"http://{host}/redirect?to=http://{host}/web.safetensors"
    assert _plug(client, inside, name="redirected").status_code == 201
    port = host.split(":")[1]
    for target in (f"http://localhost:{port}/web.safetensors", "http://169.254.169.254/latest/meta-data"):
        message = _refusal(_plug(client, f"http://{host}/redirect?to={target}", name="elsewhere"))
        assert "not allowed" in message
    assert "HTTP 404" in _refusal(_plug(client, f"http://{host}/missing.safetensors"))
    assert sorted(e["name"] for e in client.get("/experts").json()) == ["redirected", "web"]


def test_refused_hosts_get_the_same_answer_open_port_or_not(make_client, web: tuple[str, Path]) -> None:
    host, _ = web
    client = make_client(source_hosts="example.invalid")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    open_answer = _refusal(_plug(client, f"http://{host}/x")).replace(host, "<host>")
    closed_answer = _refusal(_plug(client, f"http://127.0.0.1:{closed_port}/x")).replace(
        f"127.0.0.1:{closed_port}", "<host>"
    )
    assert open_answer == closed_answer and "not allowed" in open_answer


def test_a_trickling_server_is_cut_at_the_deadline(make_client, web: tuple[str, Path]) -> None:
    host, _ = web
    client = make_client(source_hosts=host, source_timeout_s=1.5)
    started = time.monotonic()
    message = _refusal(_plug(client, f"http://{host}/trickle"))
    took = time.monotonic() - started
    assert "longer than 1.5 s" in message and took < 5, took


def test_a_url_claiming_more_than_the_cap_is_413_before_its_body(make_client, web: tuple[str, Path]) -> None:
    host, _ = web
    client = make_client(source_hosts=host, max_upload_bytes=1 << 20)
    response = _plug(client, f"http://{host}/huge")
    assert response.status_code == 413 and response.json()["error"]["param"] == "source"


# --- `~` and malformed sources: one 422 whatever the account, never a 5xx (issue 24, finding 3) ---------
# (`~user/...` was a 500 for an unknown account, and `~root` a 422: it told which accounts exist)


def _json_refusal(client: TestClient, source: str) -> str:
    body = json.dumps({"source": source})  # ASCII with \u escapes: lone surrogates travel as JSON allows
    response = client.post("/experts", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, (source, response.status_code, response.text)
    return response.json()["detail"]


def test_an_unknown_account_is_a_422_not_a_500(client: TestClient) -> None:
    message = _json_refusal(client, "~nosuchuser-plugmoe/experts/x.safetensors")
    assert "not expanded" in message and "--source-roots" in message


def test_existing_and_missing_accounts_get_the_same_answer(client: TestClient) -> None:
    sources = {
        "root": "~root/x.safetensors",
        "the server's own account": f"~{getpass.getuser()}/x.safetensors",
        "the server's home": "~/x.safetensors",
        "missing account": "~nosuchuser-plugmoe/x.safetensors",
        "file URL without a slash": "file:~root/x.safetensors",
    }
    answers = {
        case: _json_refusal(client, source).replace(repr(source), "<source>") for case, source in sources.items()
    }
    assert len(set(answers.values())) == 1, answers


@pytest.mark.parametrize(
    "source",
    ["\ud800", "/tmp/\udcff.safetensors", "http://[::1", "https://[fe80::1/x", "file://%zz/x"],
    ids=["lone surrogate", "surrogate in a path", "unclosed IPv6 host", "unclosed IPv6 https", "bad file host"],
)
def test_malformed_sources_are_4xx(client: TestClient, source: str) -> None:
    body = json.dumps({"source": source})
    response = client.post("/experts", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, (response.status_code, response.text)  # the JSON parser may refuse first
    assert client.get("/experts").json() == []


@pytest.mark.parametrize("source", ["\ud800", "/tmp/\udcff.safetensors", "http://[::1", "~root/x", "~nobody-x/x"])
def test_expert_sources_raise_a_source_error_for_what_no_parser_refused(tmp_path: Path, source: str) -> None:
    sources = ExpertSources(Settings(source_roots=str(tmp_path), source_hosts="example.org"))
    with pytest.raises(ExpertSourceError):
        asyncio.run(sources.fetch(source))
