"""Access control: server.auth.refusal (the request guard's one check) called as a function on an admin write and
on a generation, then the routes it guards (the writing /experts endpoints, generation) through the whole app:
--api-keys guard every endpoint but --open-paths, an admin write without a token is refused when the request
was forwarded or the server listens beyond loopback (with a log line saying why), and uvicorn runs with proxy
headers off (a forwarded header cannot make a remote client loopback). Then the client's identity, as the guard
names it for the routes."""

from __future__ import annotations

import logging

import pytest
import uvicorn

from server.auth import client_identity, is_loopback, refusal
from server.cli import main
from server.connection_guard import ConnectionGuard
from server.errors import AuthError
from server.settings import Settings

REMOTE = "203.0.113.9"


def headers(authorization: str | None = None) -> dict[str, str]:
    return {"authorization": authorization} if authorization is not None else {}


def refused(path: str, authorization: str | None, host: str | None, settings: Settings) -> AuthError | None:
    """The guard's verdict on a POST to `path`."""
    return refusal("POST", path, headers(authorization), host, settings)


def admin_write(authorization: str | None, host: str | None, settings: Settings) -> AuthError | None:
    return refused("/experts", authorization, host, settings)


def generation(authorization: str | None, settings: Settings) -> AuthError | None:
    return refused("/generate", authorization, REMOTE, settings)


def outcome(verdict: AuthError | None) -> int:
    """200 when the guard lets the request through, else the AuthError's status."""
    return 200 if verdict is None else verdict.status


ADMIN_CASES = [
    # (admin token, Authorization header, client host, status)
    ("s3cret", None, "127.0.0.1", 401),
    ("s3cret", "Bearer s3cret", "127.0.0.1", 200),
    ("s3cret", "Bearer s3cret", REMOTE, 200),  # with a token, where the client is does not matter
    ("s3cret", "bearer  s3cret ", REMOTE, 200),  # the scheme in any case, spaces around the token
    ("s3cret", "Bearer wrong", "127.0.0.1", 403),
    ("s3cret", "Bearer s3cre", "127.0.0.1", 403),
    ("s3cret", "Bearer", "127.0.0.1", 401),
    ("s3cret", "Bearer   ", "127.0.0.1", 401),
    ("s3cret", "Basic s3cret", "127.0.0.1", 401),
    (None, None, "127.0.0.1", 200),
    (None, None, "127.8.9.10", 200),
    (None, None, "::1", 200),
    (None, None, REMOTE, 403),
    (None, "Bearer anything", REMOTE, 403),  # no token configured: a header opens nothing
    (None, None, "testclient", 403),  # not an address
    (None, None, None, 403),  # no client address known
]


@pytest.mark.parametrize(("token", "header", "host", "status"), ADMIN_CASES)
def test_admin_writes(token: str | None, header: str | None, host: str | None, status: int) -> None:
    assert outcome(admin_write(header, host, Settings(admin_token=token))) == status


def test_an_admin_refusal_says_what_to_send() -> None:
    settings = Settings(admin_token="s3cret")
    assert "needs `Authorization: Bearer <admin token>`" in str(admin_write(None, "127.0.0.1", settings))
    assert "the admin token is wrong" in str(admin_write("Bearer no", "127.0.0.1", settings))
    reason = str(admin_write(None, REMOTE, Settings(admin_token=None)))
    assert f"only loopback clients may change experts (this client: {REMOTE})" in reason


API_KEY_CASES = [
    # (api keys, admin token, Authorization header, status)
    (None, None, None, 200),  # no keys: generation is open, from anywhere
    ("", "adm", None, 200),
    ("k1,k2", None, None, 401),
    ("k1,k2", None, "Bearer k2", 200),
    ("k1,k2", None, "Bearer k1", 200),
    ("k1,k2", None, "Bearer k3", 403),
    ("k1,k2", None, "Bearer k1,k2", 403),
    ("k1,k2", None, "Token k1", 401),
    ("k1,k2", "adm", "Bearer adm", 200),  # the admin token is a key too
    ("k1,k2", None, "Bearer adm", 403),
]


@pytest.mark.parametrize(("keys", "admin", "header", "status"), API_KEY_CASES)
def test_api_keys(keys: str | None, admin: str | None, header: str | None, status: int) -> None:
    settings = Settings(api_keys=keys, admin_token=admin)
    assert outcome(generation(header, settings)) == status


def test_an_api_key_refusal_says_what_to_send() -> None:
    settings = Settings(api_keys="k1")
    assert "needs `Authorization: Bearer <api key>`" in str(generation(None, settings))
    assert "the API key is not valid" in str(generation("Bearer k2", settings))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.255.0.1", True), ("::1", True), ("10.0.0.1", False), ("::ffff:8.8.8.8", False),
     ("localhost", False), ("", False), (None, False)],
)  # fmt: skip
def test_is_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# --- the routes that use them -------------------------------------------------------------------------------


def _upload(client, data: bytes, headers: dict | None = None):
    return client.post("/experts", files={"file": ("upload.safetensors", data)}, headers=headers or {})


def test_admin_token_guards_writes(make_client, expert_bytes) -> None:
    client = make_client(admin_token="s3cret")
    data = expert_bytes("guarded")
    assert _upload(client, data).status_code == 401
    assert _upload(client, data, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert _upload(client, data, headers={"Authorization": "Bearer s3cret"}).status_code == 201
    assert client.delete("/experts/guarded").status_code == 401
    assert client.delete("/experts/guarded", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.get("/experts").status_code == 200  # reading stays open
    assert client.delete("/experts/guarded", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_without_admin_token_only_loopback_may_write(make_client, expert_bytes) -> None:
    remote = make_client(client=("203.0.113.9", 4000))
    response = _upload(remote, expert_bytes("remote"))
    assert response.status_code == 403 and "loopback" in response.json()["detail"]
    assert remote.get("/experts").status_code == 200
    assert make_client(client=("::1", 4000)).post("/experts", json={"source": "/nope"}).status_code == 422


def test_api_keys_guard_generation(make_client) -> None:
    client = make_client(api_keys="k1,k2")
    body = {"prompt": "hi", "max_new_tokens": 2}
    assert client.post("/generate", json=body).status_code == 401
    assert client.post("/generate", json=body, headers={"Authorization": "Bearer k3"}).status_code == 403
    assert client.post("/generate", json=body, headers={"Authorization": "Bearer k2"}).status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/health").status_code == 200


def test_an_auth_refusal_asks_for_a_bearer_token(make_client) -> None:
    response = make_client(api_keys="k1").post("/generate", json={"prompt": "hi"})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"] == {
        "message": "this endpoint needs `Authorization: Bearer <api key>`",
        "type": "AuthError",
        "param": None,
        "code": 401,
    }


# --- the whole app: every endpoint behind the keys, admin writes through a proxy or on a wide bind address --------

EVERY_ENDPOINT = [
    ("GET", "/experts"),
    ("GET", "/experts/x"),
    ("POST", "/experts"),
    ("DELETE", "/experts/x"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/v1/models"),
    ("POST", "/generate"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/no-such-path"),
]


def test_api_keys_guard_every_endpoint_but_health_and_ready(make_client) -> None:
    client = make_client(api_keys="k1")
    for method, path in EVERY_ENDPOINT:
        response = client.request(method, path)
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.json()["error"]["code"] == 401 and response.headers["www-authenticate"] == "Bearer"
        wrong = client.request(method, path, headers={"Authorization": "Bearer k2"})
        assert wrong.status_code == 403, (method, path)
        right = client.request(method, path, headers={"Authorization": "Bearer k1"})
        assert right.status_code not in (401, 403), (method, path, right.status_code)
    assert client.get("/health").status_code == 200
    assert client.get("/ready").json() == {"status": "ready"}, "open for probes (tests/server/test_health.py)"


def test_the_guard_covers_every_route_the_app_has(make_client) -> None:
    """Access control is the request guard's alone (no route checks again): every route of the app, from every
    router, is refused without a key, and every write of the admin API without admin rights."""
    import re

    client = make_client(api_keys="k1")
    # every operation of every router, as the API schema lists them: (method, path with "x" for each parameter)
    paths = client.app.openapi()["paths"]
    routes = [(method.upper(), re.sub(r"{[^}]+}", "x", path)) for path, ops in paths.items() for method in ops]
    assert ("POST", "/v1/load_lora_adapter") in routes and ("DELETE", "/experts/x") in routes
    for method, path in routes:
        if path not in ("/health", "/ready"):  # --open-paths' default
            assert client.request(method, path).status_code == 401, (method, path)
    admin = make_client(admin_token="s3cret")
    for method, path in routes:
        if method != "GET" and (path.startswith("/experts") or "lora_adapter" in path):
            response = admin.request(method, path, headers={"Authorization": "Bearer wrong"})
            assert response.status_code == 403, (method, path, response.status_code)


def test_open_paths_are_configurable(make_client) -> None:
    client = make_client(api_keys="k1", open_paths="/health,/ready,/metrics")
    assert [client.get(p).status_code for p in ("/health", "/ready", "/metrics")] == [200, 200, 200]
    assert client.get("/experts").status_code == 401
    closed = make_client(api_keys="k1", open_paths="")
    assert closed.get("/health").status_code == 401


def test_the_admin_token_also_serves_as_an_api_key(make_client) -> None:
    client = make_client(api_keys="k1", admin_token="admin")
    assert client.get("/experts", headers={"Authorization": "Bearer admin"}).status_code == 200
    assert client.delete("/experts/x", headers={"Authorization": "Bearer k1"}).status_code == 403  # not admin


@pytest.mark.parametrize(
    "header", [{"X-Forwarded-For": "203.0.113.7"}, {"Forwarded": "for=203.0.113.7"}, {"X-Real-IP": "203.0.113.7"}]
)
def test_admin_without_a_token_is_refused_through_a_proxy(
    make_client, expert_bytes, header: dict, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client()  # loopback peer, as a reverse proxy on the same host is
    with caplog.at_level(logging.WARNING, logger="server.auth"):
        response = client.post("/experts", files={"file": ("x.safetensors", expert_bytes("proxied"))}, headers=header)
    assert response.status_code == 403, response.text
    assert "proxy" in response.json()["detail"] and "--admin-token" in response.json()["detail"]
    assert any("refused an admin request" in r.getMessage() and "proxy" in r.getMessage() for r in caplog.records)
    assert client.delete("/experts/x", headers=header).status_code == 403
    assert client.get("/experts", headers=header).status_code == 200  # reading stays open
    with_token = make_client(admin_token="t")
    response = with_token.post(
        "/experts",
        files={"file": ("x.safetensors", expert_bytes("proxied"))},
        headers={**header, "Authorization": "Bearer t"},
    )
    assert response.status_code == 201, "with a token, a proxied admin request is fine"


def test_admin_without_a_token_is_refused_when_not_bound_to_loopback(
    make_client, expert_bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        client = make_client(host="0.0.0.0")
    assert any("without --admin-token" in r.getMessage() for r in caplog.records), "a warning at start"
    response = client.post("/experts", files={"file": ("x.safetensors", expert_bytes("wide"))})
    assert response.status_code == 403 and "0.0.0.0" in response.json()["detail"]
    assert client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


def test_uvicorn_does_not_trust_forwarded_headers(monkeypatch: pytest.MonkeyPatch, tiny_model_dir) -> None:
    """The client address is the socket's peer: X-Forwarded-For cannot make a remote client loopback."""
    seen: list[uvicorn.Config] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.append(self.config))
    assert main(["serve", "--model", str(tiny_model_dir), "--max-header-bytes", "4096"]) == 0
    (config,) = seen
    assert config.proxy_headers is False
    assert issubclass(config.http, ConnectionGuard) and config.http.max_header_bytes == 4096  # guarded
    assert config.h11_max_incomplete_event_size == 4096  # h11's own limit, under --http-parser h11


# --- client identity (issue 24 item 2: per-client shares and round-robin) -----------------------------------


def test_client_identity_is_the_key_hashed_else_the_address() -> None:

    keyed = Settings(api_keys="alpha,beta")
    alpha, beta = (client_identity(headers(f"Bearer {key}"), "127.0.0.1", keyed) for key in ("alpha", "beta"))
    assert alpha.startswith("key:") and alpha != beta and "alpha" not in alpha, "the key itself is never kept"
    assert client_identity(headers("Bearer alpha"), "10.0.0.9", keyed) == alpha, "the key, not where"
    open_server = Settings()
    assert client_identity(headers("Bearer alpha"), "10.0.0.9", open_server) == "addr:10.0.0.9"
    assert client_identity(headers(), "10.0.0.8", open_server) == "addr:10.0.0.8"
    assert client_identity(headers(), None, open_server) == "addr:unknown"


def test_a_key_over_its_share_is_429_and_another_key_is_served(make_client) -> None:
    """One client (key) holds its share of sequences in flight; the other key is not refused."""
    import threading

    client = make_client(api_keys="heavy,light", max_sequences_per_client=1)
    engine = client.app.state.engine
    body = {"prompt": "The quick brown fox", "max_new_tokens": 4}
    heavy, light = ({"Authorization": f"Bearer {key}"} for key in ("heavy", "light"))
    gate = threading.Event()
    engine.call(gate.wait)  # the engine thread waits: heavy's first request stays in flight
    first = threading.Thread(target=client.post, args=("/generate",), kwargs={"json": body, "headers": heavy})
    first.start()
    while engine.queue_depth < 1:
        threading.Event().wait(0.01)
    refused = client.post("/generate", json=body, headers=heavy)
    served: list = []
    second = threading.Thread(target=lambda: served.append(client.post("/generate", json=body, headers=light)))
    second.start()
    while engine.queue_depth < 2:
        threading.Event().wait(0.01)
    gate.set()
    first.join(60)
    second.join(60)
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    assert served[0].status_code == 200
