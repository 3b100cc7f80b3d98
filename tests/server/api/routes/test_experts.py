"""/experts in-process: plug (upload, source), describe, unplug, persistence, metrics, memory. Access control:
tests/server/test_auth.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from moe import ExpertFile
from server.expert_store import ExpertStore
from tests.tiny import tiny_expert


def _stored(tmp_path: Path) -> ExpertStore:
    return ExpertStore(tmp_path / "experts")


def _upload(client: TestClient, data: bytes, **form) -> object:
    return client.post(
        "/experts",
        files={"file": ("upload.safetensors", data)},
        data={k: str(v).lower() if isinstance(v, bool) else v for k, v in form.items()},
    )


def _metric_lines(client: TestClient, name: str) -> list[str]:
    return [line for line in client.get("/metrics").text.splitlines() if line.startswith(name)]


def test_plug_describe_list_unplug(client: TestClient, expert_bytes, tmp_path: Path) -> None:
    response = _upload(client, expert_bytes("math"))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "math" and body["replaced"] is False and body["admission"] is None
    assert body["description"] == "the math expert" and body["examples"] == ["an example for math"]
    assert body["kind"] == "bottleneck" and body["rank"] == 4 and body["layers"] == [0, 1]
    assert body["size_bytes"] > 0 and body["plugged_at"] and body["tokens_routed"] == 0
    manifest = _stored(tmp_path).current()
    assert manifest.names == ("math",) and manifest.version == 1
    blob = _stored(tmp_path).blobs / f"{manifest.experts[0].sha256}.safetensors"
    assert ExpertFile.load(blob).name == "math"

    client.post("/generate", json={"prompt": "1 + 1 =", "max_new_tokens": 4})
    listed = client.get("/experts").json()
    assert [e["name"] for e in listed] == ["math"]
    assert listed[0]["tokens_routed"] > 0
    assert client.get("/experts/math").json()["tokens_routed"] == listed[0]["tokens_routed"]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]][1:] == ["math"]

    response = client.delete("/experts/math")
    assert response.status_code == 200 and response.json() == {"name": "math", "unplugged": True, "purged": False}
    assert client.get("/experts").json() == []
    assert _stored(tmp_path).current().names == () and _stored(tmp_path).current().version == 2
    assert blob.is_file()  # kept without purge
    assert client.get("/experts/math").status_code == 404
    assert client.delete("/experts/math").status_code == 404


def test_taken_name_is_409_and_replace_swaps(client: TestClient, expert_bytes) -> None:
    assert _upload(client, expert_bytes("code")).status_code == 201
    taken = _upload(client, expert_bytes("code", seed=3))
    assert taken.status_code == 409 and "already plugged" in taken.json()["detail"]
    replaced = _upload(client, expert_bytes("code", seed=3, rank=8), replace=True)
    assert replaced.status_code == 201 and replaced.json()["replaced"] is True
    assert client.get("/experts/code").json()["rank"] == 8
    renamed = _upload(client, expert_bytes("code"), name="code2")
    assert renamed.status_code == 201 and renamed.json()["name"] == "code2"
    assert [e["name"] for e in client.get("/experts").json()] == ["code", "code2"]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda b, fp: b"not a safetensors file at all", "not a safetensors file"),
        (
            lambda b, fp: ExpertFile.to_bytes(tiny_expert("other"), dataclasses.replace(fp, weights_hash="0" * 16)),
            "another backbone",
        ),
        (
            lambda b, fp: ExpertFile.to_bytes(tiny_expert("wide", hidden=64), dataclasses.replace(fp, hidden_size=64)),
            "hidden_size",
        ),
    ],
)
def test_bad_files_are_422_with_the_reason(
    client: TestClient, expert_bytes, backbone_fingerprint, make, needle: str
) -> None:
    response = _upload(client, make(expert_bytes, backbone_fingerprint))
    assert response.status_code == 422
    assert needle in response.json()["detail"]
    assert client.get("/experts").json() == []


def test_bad_name_is_422(client: TestClient, expert_bytes) -> None:
    response = _upload(client, expert_bytes("fine"), name="Not OK")
    assert response.status_code == 422 and "invalid" in response.json()["detail"]
    assert _upload(client, expert_bytes("fine"), name="base").status_code == 422


def test_plug_from_local_path_and_file_url(make_client, expert_bytes, tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "local.safetensors"
    path.parent.mkdir()
    client = make_client(source_roots=str(path.parent))  # local sources are read under --source-roots only
    path.write_bytes(expert_bytes("local"))
    assert client.post("/experts", json={"source": str(path)}).status_code == 201
    response = client.post("/experts", json={"source": path.as_uri(), "name": "viaurl"})
    assert response.status_code == 201
    # a renamed upload is stored under its new name, with the new name inside
    store = _stored(tmp_path)
    entry = store.current().get("viaurl")
    assert ExpertFile.load(store.read_blob(entry.sha256)).name == "viaurl"
    missing = client.post("/experts", json={"source": str(tmp_path / "nope.safetensors")})
    assert missing.status_code == 422 and "nope.safetensors" in missing.json()["detail"]
    assert client.post("/experts", json={"source": "ftp://example/x"}).status_code == 422


def test_malformed_plug_requests_are_400(client: TestClient) -> None:
    assert client.post("/experts", content=b"x", headers={"content-type": "text/plain"}).status_code == 400
    assert client.post("/experts", json={"name": "no-source"}).status_code == 400
    assert client.post("/experts", data={"name": "no-file"}, files={"other": ("a", b"b")}).status_code == 400


def test_experts_survive_a_restart_and_purge_deletes(make_client, expert_bytes, tmp_path: Path) -> None:
    first = make_client()
    assert _upload(first, expert_bytes("keep")).status_code == 201
    assert _upload(first, expert_bytes("gone", seed=2)).status_code == 201
    gone = _stored(tmp_path).current().get("gone")
    assert first.delete("/experts/gone", params={"purge": "true"}).json()["purged"] is True
    assert not (_stored(tmp_path).blobs / f"{gone.sha256}.safetensors").exists()
    second = make_client()
    assert [e["name"] for e in second.get("/experts").json()] == ["keep"]


def test_metrics_series_follow_the_plugged_set(client: TestClient, expert_bytes) -> None:
    assert _upload(client, expert_bytes("tracked")).status_code == 201
    routed = _metric_lines(client, 'plugmoe_routed_tokens_total{expert="tracked"')
    assert len(routed) == 2 and all(line.endswith(" 0.0") for line in routed)  # one per layer, at 0
    assert _metric_lines(client, 'plugmoe_expert_info{expert="tracked"} 1.0')
    assert _metric_lines(client, "plugmoe_experts_plugged 1.0")
    client.post("/generate", json={"prompt": "hi", "max_new_tokens": 3})
    assert _metric_lines(client, 'plugmoe_request_expert_share_count{expert="tracked"} 1.0')
    assert _metric_lines(client, "plugmoe_routing_entropy_bits_count 1.0")
    assert _metric_lines(client, 'plugmoe_requests_total{endpoint="/generate",status="200"} 1.0')
    assert _metric_lines(client, 'plugmoe_plug_operations_total{action="plug",result="ok"} 1.0')
    for name in (
        "plugmoe_time_to_first_token_seconds_count",
        "plugmoe_inter_token_latency_seconds_count",
        "plugmoe_generated_tokens_total",
        "plugmoe_prompt_tokens_total",
        "plugmoe_batch_size_count",
        "plugmoe_queue_depth",
        "plugmoe_running_sequences",
        "plugmoe_request_duration_seconds_count",
    ):
        assert _metric_lines(client, name), name
    client.delete("/experts/tracked")
    assert not [line for line in client.get("/metrics").text.splitlines() if 'expert="tracked"' in line]
    assert _metric_lines(client, 'plugmoe_plug_operations_total{action="unplug",result="ok"} 1.0')
    assert _metric_lines(client, "plugmoe_experts_plugged 0.0")


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_200_plug_unplug_cycles_keep_memory_flat(client: TestClient, expert_bytes) -> None:
    # rank 256 (the default --max-expert-rank) on 2 layers: ~130 KB of weights per expert, so a leak of every copy
    # would add ~26 MB
    data = expert_bytes("cycle", rank=256)

    def cycle() -> None:
        assert _upload(client, data).status_code == 201
        client.post(
            "/generate", json={"prompt": "hi", "max_new_tokens": 2, "routing": {"mode": "pin", "expert": "cycle"}}
        )
        assert client.delete("/experts/cycle", params={"purge": "true"}).status_code == 200

    for _ in range(20):  # warm up allocator pools and caches
        cycle()
    before = _rss_bytes()
    for _ in range(200):
        cycle()
    grown = _rss_bytes() - before
    assert grown < 15 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 200 cycles"
    assert client.get("/experts").json() == []


def test_memory_per_plugged_expert_counts_the_padding(client: TestClient, expert_bytes) -> None:
    """issue 24 item 4: GET /experts reports the bytes each expert's slot takes; slots are padded to the largest
    rank plugged, so plugging a higher-rank expert grows every expert's figure."""
    assert _upload(client, expert_bytes("narrow", rank=4)).status_code == 201
    (before,) = [e["memory_bytes"] for e in client.get("/experts").json()]
    assert before > 0 and client.get("/experts/narrow").json()["memory_bytes"] == before
    assert _upload(client, expert_bytes("wide", rank=12, seed=2)).status_code == 201
    after = {e["name"]: e["memory_bytes"] for e in client.get("/experts").json()}
    assert after["narrow"] == after["wide"] > before
    # down [H, r] and up [r, H] per layer, float32: 8 more ranks on at least one layer
    assert after["wide"] - before >= 2 * 32 * 8 * 4


def test_an_expert_file_over_the_rank_cap_is_422_naming_it(client: TestClient, expert_bytes) -> None:
    response = _upload(client, expert_bytes("huge", rank=300))
    assert response.status_code == 422, response.text
    assert "rank 300, over the cap of 256" in response.text and "--max-expert-rank" in response.text


def test_the_rank_cap_is_the_servers_setting(make_client, expert_bytes) -> None:
    client = make_client(max_expert_rank=8)
    response = _upload(client, expert_bytes("wide", rank=12))
    assert response.status_code == 422, response.text
    assert "rank 12, over the cap of 8" in response.text and "--max-expert-rank" in response.text
    assert _upload(client, expert_bytes("narrow", rank=8)).status_code == 201
    assert [e["name"] for e in client.get("/experts").json()] == ["narrow"]
