"""Issue 24, finding 7: the store only grew. The same expert plugged 5 times wrote 5 blobs (safetensors writes
its metadata in a new order every time, so content addressing never deduped), an unplugged expert's file could
not be purged later (404), every replace kept the previous blob, and nothing said how big the store was.

Target: N plugs of the same file = 1 blob; after unplug + purge + GC, blobs = experts referenced.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from moe import ExpertFile
from tests.tiny import tiny_expert

SAMPLE = ["the owner's domain text, one", "the owner's domain text, two"]


def _upload(client: TestClient, data: bytes, **form: str):
    return client.post("/experts", files={"file": ("x.safetensors", data)}, data=form)


def _blobs(client: TestClient) -> set[str]:
    return {p.name.removesuffix(".safetensors") for p in Path(client.app.state.experts.store.blobs).iterdir()}


def _served_shas(client: TestClient) -> set[str]:
    return {e.sha256 for e in client.app.state.experts.manifest.experts}


# --- canonical serialisation ------------------------------------------------------------------------------


def test_one_expert_serialises_to_the_same_bytes_every_time(backbone_fingerprint) -> None:
    expert = tiny_expert("same", threshold=-2.0, metadata={"provenance": {"b": 1, "a": 2}, "created": "2026-01-01"})
    files = {ExpertFile.to_bytes(expert, backbone_fingerprint) for _ in range(5)}
    assert len(files) == 1, "safetensors' metadata order must not leak into the file"
    (data,) = files
    loaded = ExpertFile.load(data, backbone_fingerprint)
    assert loaded.name == "same" and loaded.metadata["provenance"] == {"b": 1, "a": 2}
    assert ExpertFile.to_bytes(loaded, backbone_fingerprint) == data, "load then save is the same file"
    header_size = int.from_bytes(data[:8], "little")
    assert header_size % 8 == 0 and data[8:9] == b"{", "the header stays 8-byte aligned JSON"


def test_a_renamed_expert_plugged_five_times_is_one_blob(client: TestClient, expert_bytes) -> None:
    data = expert_bytes("original")  # plugged under another name: the server re-serialises it every time
    for attempt in range(5):
        response = _upload(client, data, name="renamed", replace="true")
        assert response.status_code == 201, response.text
        assert response.json()["replaced"] is (attempt > 0)
    assert _blobs(client) == _served_shas(client) and len(_blobs(client)) == 1


def test_a_repaired_expert_plugged_five_times_is_one_blob(make_client, expert_bytes, backbone_fingerprint) -> None:
    client = make_client(admission="repair")
    owner = tiny_expert("owner", seed=1, up_scale=0.3, metadata={"domain_sample": SAMPLE})
    assert _upload(client, ExpertFile.to_bytes(owner, backbone_fingerprint)).status_code == 201
    greedy = expert_bytes("greedy", open_gate=True)  # wins every token: admission repair raises its thresholds
    for _ in range(5):
        response = _upload(client, greedy, replace="true")
        assert response.status_code == 201, response.text
        assert response.json()["admission"]["repair"] is not None, "the stored file is the repaired one"
    assert len(_blobs(client)) == 2 and _blobs(client) == _served_shas(client)


def test_the_same_file_plugged_again_after_an_unplug_reuses_its_blob(client: TestClient, expert_bytes) -> None:
    data = expert_bytes("twice")
    assert _upload(client, data).status_code == 201
    assert client.delete("/experts/twice").status_code == 200
    assert _upload(client, data).status_code == 201
    assert len(_blobs(client)) == 1


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()
