"""Issue 24, finding 9: under --api-keys, /ready needed a key, so readiness probes (which send none) failed. It is
open by default now (--open-paths /health,/ready) and shows a caller without a key its status only. Issue 22: while
the engine compiles its decode steps at start (--compile-decode), /ready is a 503 "warming"."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from moe.decode.static_decoder import StaticDecoder

KEY = {"Authorization": "Bearer k1"}


def test_ready_is_open_to_probes_under_api_keys(make_client) -> None:
    client = make_client(api_keys="k1")
    probe = client.get("/ready")
    assert probe.status_code == 200 and probe.json() == {"status": "ready"}, "status only: no experts or versions"
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 401 and client.get("/experts").status_code == 401


def test_ready_with_a_key_has_the_details(make_client, expert_bytes) -> None:
    client = make_client(api_keys="k1")
    assert client.post("/experts", files={"file": ("x", expert_bytes("math"))}, headers=KEY).status_code == 201
    body = client.get("/ready", headers=KEY).json()
    assert body["status"] == "ready" and body["experts"] == ["math"] and body["version"] == 1
    wrong = client.get("/ready", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 200 and wrong.json() == {"status": "ready"}, "a wrong key is no key"


def test_stale_is_a_503_for_probes_too(make_client) -> None:
    client = make_client(api_keys="k1", poll_interval_s=0)
    served = client.app.state.experts
    served.behind_since = served.behind_since or 0.0  # the store has held a newer version since boot
    served.store_version = served.version + 1
    probe = client.get("/ready")
    assert probe.status_code == 503 and probe.json() == {"status": "stale"}


def test_an_operator_can_close_ready_again(make_client) -> None:
    client = make_client(api_keys="k1", open_paths="/health")
    assert client.get("/ready").status_code == 401


def test_without_api_keys_ready_has_the_details(client: TestClient) -> None:
    body = client.get("/ready").json()
    assert body["status"] == "ready" and "version" in body and "experts" in body


def test_ready_is_a_503_while_the_engine_compiles_its_decode_steps(make_client, monkeypatch) -> None:
    """The engine thread compiles its steps (StaticDecoder.warm_up_compiled) before its loop: held here until
    released, /ready says warming (to a probe and to a caller with a key), then ready."""
    release, entered = threading.Event(), threading.Event()
    compile_steps = StaticDecoder.warm_up_compiled

    def held(decoder: StaticDecoder, *args, **kwargs):
        entered.set()
        assert release.wait(60), "the test never released the warm-up"
        return compile_steps(decoder, *args, **kwargs)

    monkeypatch.setattr(StaticDecoder, "warm_up_compiled", held)
    client = make_client(api_keys="k1")
    assert entered.wait(60)
    for headers in ({}, KEY):
        probe = client.get("/ready", headers=headers)
        assert probe.status_code == 503 and probe.json() == {"status": "warming"}
    assert client.get("/health").status_code == 200, "alive meanwhile"
    release.set()
    deadline = time.monotonic() + 60
    while client.app.state.engine.warming and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.get("/ready").json() == {"status": "ready"}
