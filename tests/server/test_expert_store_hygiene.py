"""Issue 24, finding 7: the store only grew. The same expert plugged 5 times wrote 5 blobs (safetensors writes
its metadata in a new order every time, so content addressing never deduped), an unplugged expert's file could
not be purged later (404), every replace kept the previous blob, and nothing said how big the store was.

Target: N plugs of the same file = 1 blob; after unplug + purge + GC, blobs = experts referenced.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from moe import ExpertFile
from server.expert_store import ExpertStore, Manifest, ManifestEntry
from tests.tiny import tiny_expert

SAMPLE = ["the owner's domain text, one", "the owner's domain text, two"]


def _upload(client: TestClient, data: bytes, **form: str):
    return client.post("/experts", files={"file": ("x.safetensors", data)}, data=form)


def _blobs(client: TestClient) -> set[str]:
    return {p.name.removesuffix(".safetensors") for p in Path(client.app.state.experts.store.blobs).iterdir()}


def _served_shas(client: TestClient) -> set[str]:
    return {e.sha256 for e in client.app.state.experts.manifest.experts}


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


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


# --- purge of an expert unplugged earlier --------------------------------------------------------------------


def test_an_expert_unplugged_earlier_can_be_purged(client: TestClient, expert_bytes) -> None:
    assert _upload(client, expert_bytes("old")).status_code == 201
    assert _upload(client, expert_bytes("old", seed=3), replace="true").status_code == 201  # two files named old
    assert _upload(client, expert_bytes("kept")).status_code == 201
    assert client.delete("/experts/old").status_code == 200  # unplugged, files kept
    assert len(_blobs(client)) == 3
    version = client.app.state.experts.version
    response = client.delete("/experts/old", params={"purge": "true"})
    assert response.status_code == 200, response.text
    assert response.json() == {"name": "old", "unplugged": False, "purged": True}
    assert response.headers["X-Plugmoe-Expert-Set-Version"] == str(version), "nothing was committed"
    assert _blobs(client) == _served_shas(client), "both files of `old` are gone, the served one stays"
    again = client.delete("/experts/old", params={"purge": "true"})
    assert again.status_code == 200 and again.json()["purged"] is False


def test_purging_a_name_never_stored_is_404(client: TestClient) -> None:
    response = client.delete("/experts/never", params={"purge": "true"})
    assert response.status_code == 404 and "was ever stored" in response.json()["detail"]
    assert client.delete("/experts/never").status_code == 404


def test_a_purge_keeps_a_file_the_current_set_uses_under_another_name(client: TestClient, expert_bytes) -> None:
    data = expert_bytes("shared")
    assert _upload(client, data).status_code == 201
    assert _upload(client, data, name="alias").status_code == 201  # renamed: a different file (its name inside)
    assert client.delete("/experts/shared").status_code == 200
    served = client.app.state.experts
    alias = served.manifest.get("alias")
    entry = ManifestEntry("shared", alias.sha256, alias.size)
    served.store.commit(served.store.current(), (*served.store.current().experts, entry))  # same file, 2 names
    served.store.commit(served.store.current(), served.store.current().without("shared"))
    response = client.delete("/experts/shared", params={"purge": "true"})
    assert response.status_code == 200
    assert alias.sha256 in _blobs(client), "the file `alias` is served from stays"


# --- garbage collection -----------------------------------------------------------------------------------


def _age(store: ExpertStore, seconds: float) -> None:
    """Make every stored file `seconds` old."""
    past = time.time() - seconds
    for path in Path(store.blobs).iterdir():
        os.utime(path, (past, past))


def test_unplug_purge_and_gc_leave_exactly_the_referenced_files(make_client, expert_bytes) -> None:
    """The issue's target: after replaces, unplug + purge + GC, blobs = experts referenced."""
    client = make_client(store_gc_keep_versions=1, store_gc_grace_s=60)
    store = client.app.state.experts.store
    for name in ("a", "b", "c"):
        assert _upload(client, expert_bytes(name)).status_code == 201
    for seed in (1, 2, 3):  # three replaces: each leaves the previous file behind (young: inside the grace period)
        assert _upload(client, expert_bytes("a", seed=seed), replace="true").status_code == 201
    assert len(_blobs(client)) == 6, "files younger than the grace period are never collected"
    assert client.delete("/experts/b", params={"purge": "true"}).json()["purged"] is True
    _age(store, 120)
    assert client.delete("/experts/c").status_code == 200  # the GC after an unplug: c's file and a's old ones
    assert _blobs(client) == _served_shas(client) and len(_blobs(client)) == 1
    assert client.get("/experts").json()[0]["name"] == "a"


def test_gc_keeps_the_files_of_the_newest_k_versions(make_client, expert_bytes) -> None:
    client = make_client()
    store = client.app.state.experts.store
    for seed in range(4):  # versions 1..4: a's file changes every version
        assert _upload(client, expert_bytes("a", seed=seed), replace="true").status_code == 201
    _age(store, 3600)
    history = [store.read_manifest(v).get("a").sha256 for v in (1, 2, 3, 4)]
    response = client.post("/experts/gc", params={"keep_versions": 2})
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["version"] == 4 and report["kept_versions"] == [3, 4]
    assert sorted(report["deleted"]) == sorted(history[:2]) and report["files"] == 2
    assert _blobs(client) == set(history[2:])
    assert client.post("/experts/gc", params={"keep_versions": 2}).json()["deleted"] == []


def test_gc_without_a_keep_count_keeps_the_served_versions_files(client: TestClient, expert_bytes) -> None:
    for seed in range(2):
        assert _upload(client, expert_bytes("a", seed=seed), replace="true").status_code == 201
    _age(client.app.state.experts.store, 3600)
    report = client.post("/experts/gc").json()  # no --store-gc-keep-versions, no keep_versions: 1
    assert report["kept_versions"] == [2] and len(report["deleted"]) == 1
    assert _blobs(client) == _served_shas(client)
    assert client.post("/experts/gc", params={"keep_versions": 0}).status_code == 400


def test_gc_is_an_admin_endpoint(make_client) -> None:
    client = make_client(admin_token="secret")
    assert client.post("/experts/gc", params={"keep_versions": 1}).status_code == 401
    ok = client.post("/experts/gc", params={"keep_versions": 1}, headers={"Authorization": "Bearer secret"})
    assert ok.status_code == 200


@pytest.fixture
def store(tmp_path: Path) -> ExpertStore:
    return ExpertStore(tmp_path / "store").open()


def test_gc_spares_a_file_another_writer_reuses_within_the_grace_period(store: ExpertStore) -> None:
    old = store.put_blob(b"an old file")
    first = store.commit(Manifest(0), (ManifestEntry("x", old.sha256, old.size),))
    store.commit(first, ())  # version 2 names nothing: the file is garbage once it is old
    _age(store, 3600)
    store.put_blob(b"an old file")  # another writer's plug reuses it (it will commit it next): touched
    report = store.collect_garbage(keep_versions=1, grace_s=60)
    assert report.deleted == [] and report.kept_young == 1
    _age(store, 3600)
    assert store.collect_garbage(keep_versions=1, grace_s=60).deleted == [old.sha256]


def test_gc_spares_what_a_writer_commits_while_it_runs(store: ExpertStore, monkeypatch: pytest.MonkeyPatch) -> None:
    a = store.put_blob(b"file a")
    first = store.commit(Manifest(0), ())
    _age(store, 3600)
    listing = store.stored_files

    def list_then_race() -> list:
        files = listing()  # the collector has read versions and listed the files; now another writer commits
        store.commit(first, (ManifestEntry("a", a.sha256, a.size),))
        return files

    monkeypatch.setattr(store, "stored_files", list_then_race)
    report = store.collect_garbage(keep_versions=1, grace_s=0)
    assert report.deleted == [] and report.kept_versions == [1, 2]
    assert store.read_blob(a.sha256) == b"file a"


def test_gc_refuses_to_guess_when_a_kept_manifest_is_unreadable(store: ExpertStore) -> None:
    a = store.put_blob(b"file a")
    store.commit(Manifest(0), (ManifestEntry("a", a.sha256, a.size),))
    (Path(store.manifests) / "00000001.json").write_text("{not json")
    _age(store, 3600)
    with pytest.raises(Exception, match="unreadable"):
        store.collect_garbage(keep_versions=1, grace_s=0)
    assert store.read_blob(a.sha256) == b"file a"


def test_gc_on_an_object_store(s3_store_url) -> None:
    url, options = s3_store_url
    store = ExpertStore(url, options).open()
    a, b = store.put_blob(b"file a"), store.put_blob(b"file b")
    first = store.commit(Manifest(0), (ManifestEntry("a", a.sha256, a.size), ManifestEntry("b", b.sha256, b.size)))
    store.commit(first, first.without("b"))
    assert store.collect_garbage(keep_versions=1, grace_s=3600).deleted == [], "S3's LastModified is its age"
    report = store.collect_garbage(keep_versions=1, grace_s=0)
    assert report.deleted == [b.sha256] and (report.files, report.bytes) == (1, a.size)
    assert store.usage().files == 1


# --- store size in /metrics -------------------------------------------------------------------------------


def _sample(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_the_store_size_is_in_metrics(client: TestClient, expert_bytes) -> None:
    for name in ("a", "b"):
        assert _upload(client, expert_bytes(name)).status_code == 201
    assert client.delete("/experts/b").status_code == 200
    client.app.state.store_usage_read_at = None  # past the metrics' read interval
    text = client.get("/metrics").text
    sizes = {p.name: p.stat().st_size for p in Path(client.app.state.experts.store.blobs).iterdir()}
    assert _sample(text, "plugmoe_expert_store_files") == 2
    assert _sample(text, "plugmoe_expert_store_bytes") == sum(sizes.values())
    assert _sample(text, "plugmoe_expert_store_served_bytes") == client.app.state.experts.manifest.get("a").size
    assert _sample(text, "plugmoe_expert_store_manifests") == 3
    purged = client.delete("/experts/b", params={"purge": "true"})
    assert purged.json()["purged"] is True
    assert 'plugmoe_expert_store_deleted_files_total{reason="purge"} 1.0' in client.get("/metrics").text
