"""Finding 7 of the hardening review, access control.

With --api-keys set, /experts, /metrics, /ready and /openapi.json stayed open; behind a same-host reverse
proxy with no admin token, every remote client counted as loopback (uvicorn trusted forwarded headers from
127.0.0.1), and nothing warned. Now the keys guard every endpoint but --open-paths, admin writes without a
token are refused when the request was forwarded or the server listens beyond loopback (with a log line
saying why), and uvicorn runs with proxy headers off.
"""

from __future__ import annotations

import logging

import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.cli import main

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
    assert issubclass(config.http, H11Protocol) and config.h11_max_incomplete_event_size == 4096  # h11, guarded
