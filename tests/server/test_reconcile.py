"""Servers that share one expert store follow it: two in-process servers (the tiny model) on one store directory,
each watching it every 0.1 s, as the replicas of a cluster do."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from moe import ExpertFile
from server.expert_store import ExpertStore, ManifestEntry, StoreUnavailableError
from server.served_experts import VERSION_HEADER
from tests.tiny import tiny_expert

POLL_S = 0.1


def store_of(client: TestClient) -> ExpertStore:
    return client.app.state.experts.store


def names(client: TestClient) -> list[str]:
    return [e["name"] for e in client.get("/experts").json()]


def version(client: TestClient) -> int:
    return client.get("/ready").json()["version"]


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s: {what}")


def upload(client: TestClient, data: bytes, **form) -> object:
    fields = {k: str(v).lower() if isinstance(v, bool) else v for k, v in form.items()}
    return client.post("/experts", files={"file": ("e.safetensors", data)}, data=fields)


@pytest.fixture
def pair(make_client) -> tuple[TestClient, TestClient]:
    return make_client(poll_interval_s=POLL_S), make_client(poll_interval_s=POLL_S)


def test_a_second_server_follows_plugs_replaces_and_unplugs(pair, expert_bytes) -> None:
    a, b = pair
    plugged = upload(a, expert_bytes("math"))
    assert plugged.status_code == 201 and plugged.headers[VERSION_HEADER] == "1"
    assert "version" not in plugged.json()  # one process: no cluster fields
    wait_until(lambda: names(b) == ["math"], what="b plugs math")
    ready = b.get("/ready").json()
    assert ready["version"] == ready["store_version"] == 1 and ready["experts"] == ["math"]
    assert b.get("/experts").headers[VERSION_HEADER] == "1"
    pin = {"prompt": "1 + 1", "max_new_tokens": 3, "routing": {"mode": "pin", "expert": "math"}}
    pinned = b.post("/generate", json=pin)
    assert pinned.status_code == 200 and pinned.json()["experts"]["math"] == 1.0
    assert "plugmoe_expert_set_version 1.0" in b.get("/metrics").text

    assert upload(a, expert_bytes("math", seed=4, rank=8), replace=True).status_code == 201
    wait_until(lambda: b.get("/experts/math").json()["rank"] == 8, what="b replaces math")
    assert version(b) == 2

    assert upload(b, expert_bytes("code", seed=1)).status_code == 201
    wait_until(lambda: names(a) == ["math", "code"], what="a plugs code")
    unplugged = b.delete("/experts/math")
    assert unplugged.status_code == 200 and unplugged.json() == {"name": "math", "unplugged": True, "purged": False}
    assert unplugged.headers[VERSION_HEADER] == "4"
    wait_until(lambda: names(a) == ["code"], what="a unplugs math")
    assert version(a) == version(b) == 4
    assert a.delete("/experts/math").status_code == 404  # a's view is the store's, not its memory of math


def test_a_plug_catches_up_first_so_a_name_taken_elsewhere_is_409(make_client, expert_bytes) -> None:
    a = make_client(poll_interval_s=0)  # never polls: only a plug makes it read the store
    b = make_client(poll_interval_s=0)
    assert upload(a, expert_bytes("legal")).status_code == 201
    assert names(b) == []  # b has not read the store yet
    taken = upload(b, expert_bytes("legal", seed=2))
    assert taken.status_code == 409 and "already plugged" in taken.json()["detail"]
    assert names(b) == ["legal"]  # it caught up on the way
    assert upload(a, expert_bytes("tax", seed=3)).status_code == 201
    other = upload(b, expert_bytes("news", seed=4))  # a different name lands on top of a's version
    assert other.status_code == 201 and other.headers[VERSION_HEADER] == "3"
    assert store_of(a).current().names == ("legal", "tax", "news")
    assert names(b) == ["legal", "tax", "news"]


def test_concurrent_plugs_of_one_name_through_two_servers(pair, expert_bytes) -> None:
    a, b = pair
    for round_ in range(3):
        name = f"race{round_}"
        answers: dict[str, int] = {}
        barrier = threading.Barrier(2)

        def plug(client: TestClient, key: str, seed: int, name: str, barrier: threading.Barrier, answers: dict) -> None:
            data = expert_bytes(name, seed=seed)
            barrier.wait()
            answers[key] = upload(client, data).status_code

        threads = [
            threading.Thread(target=plug, args=(c, k, s, name, barrier, answers))
            for c, k, s in ((a, "a", 1), (b, "b", 2))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(answers.values()) == [201, 409], answers
        manifest = store_of(a).current()
        assert manifest.version == round_ + 1 and manifest.names.count(name) == 1
        wait_until(lambda m=manifest: names(a) == names(b) == list(m.names), what="both serve the winner")
        winner = manifest.get(name).sha256
        assert all(c.app.state.experts._shas[name] == winner for c in (a, b))


def test_concurrent_plugs_of_two_names_both_land(pair, expert_bytes) -> None:
    a, b = pair
    answers: list[int] = []
    barrier = threading.Barrier(2)

    def plug(client: TestClient, name: str, seed: int) -> None:
        data = expert_bytes(name, seed=seed)
        barrier.wait()
        answers.append(upload(client, data).status_code)

    threads = [threading.Thread(target=plug, args=args) for args in ((a, "left", 1), (b, "right", 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == [201, 201]
    manifest = store_of(a).current()
    assert manifest.version == 2 and sorted(manifest.names) == ["left", "right"]
    wait_until(lambda: names(a) == names(b) == list(manifest.names), what="both serve both, in manifest order")


def test_replicas_apply_in_manifest_order(pair, backbone_fingerprint) -> None:
    a, b = pair
    store = store_of(a)
    entries = {}
    for seed, name in enumerate(("x", "y", "z")):
        stored = store.put_blob(ExpertFile.to_bytes(tiny_expert(name, seed=seed, threshold=-2.0), backbone_fingerprint))
        entries[name] = ManifestEntry(name, stored.sha256, stored.size)
    first = store.commit(store.current(), (entries["x"], entries["y"], entries["z"]))
    wait_until(lambda: names(b) == ["x", "y", "z"], what="b serves x, y, z")
    store.commit(first, (entries["z"], entries["x"]))  # an operator's reordering, written to the store directly
    wait_until(lambda: names(a) == names(b) == ["z", "x"], what="both serve z, x in that order")
    assert list(a.app.state.engine.model.plugged.names) == ["z", "x"]


def test_a_file_that_is_not_an_expert_is_skipped_and_reported(pair, expert_bytes) -> None:
    a, b = pair
    assert upload(a, expert_bytes("good")).status_code == 201
    store = store_of(a)
    current = store.current()
    junk = store.put_blob(b"these bytes are not a safetensors expert file")
    store.commit(current, (*current.experts, ManifestEntry("junk", junk.sha256, junk.size)))
    wait_until(lambda: version(a) == version(b) == 2, what="both serve version 2")
    ready = b.get("/ready").json()
    assert ready["status"] == "ready" and ready["experts"] == ["good"] and "safetensors" in ready["skipped"]["junk"]
    assert names(a) == ["good"] and "junk" in a.get("/ready").json()["skipped"]


def test_an_unreadable_store_keeps_the_served_set_and_recovers(pair, expert_bytes, tmp_path: Path) -> None:
    a, b = pair
    assert upload(a, expert_bytes("kept")).status_code == 201
    wait_until(lambda: names(b) == ["kept"])
    broken = Path(store_of(b).manifests) / "00000002.json"
    broken.write_text("{half a manifest")
    wait_until(lambda: "store_error" in b.get("/ready").json(), what="b reports the broken store")
    ready = b.get("/ready")
    assert ready.status_code == 200 and ready.json()["version"] == 1 and names(b) == ["kept"]
    assert "unreadable" in ready.json()["store_error"]
    errors = [ln for ln in b.get("/metrics").text.splitlines() if ln.startswith("plugmoe_expert_store_errors_total")]
    assert errors and float(errors[0].split()[-1]) >= 1
    refused = upload(a, expert_bytes("blocked", seed=5))
    assert refused.status_code == 503 and "unreadable" in refused.json()["detail"]
    broken.unlink()  # the operator removes the broken file
    wait_until(lambda: "store_error" not in b.get("/ready").json(), what="b reads the store again")
    assert upload(a, expert_bytes("after", seed=6)).status_code == 201
    wait_until(lambda: names(b) == ["kept", "after"])


def test_a_server_that_cannot_apply_the_newest_version_goes_stale(pair, expert_bytes, monkeypatch) -> None:
    a, b = pair
    served_b = b.app.state.experts

    def unreachable(digest: str) -> bytes:
        raise StoreUnavailableError("expert store: reading a blob failed: connection refused")

    monkeypatch.setattr(served_b.store, "read_blob", unreachable)
    assert upload(a, expert_bytes("fresh")).status_code == 201
    wait_until(lambda: b.get("/ready").json()["store_version"] == 1, what="b sees version 1")
    assert b.get("/ready").json()["version"] == 0
    wait_until(lambda: b.get("/ready").status_code == 503, timeout=15, what="b is stale")
    assert b.get("/ready").json()["status"] == "stale"
    monkeypatch.undo()
    wait_until(lambda: b.get("/ready").status_code == 200, what="b catches up")
    assert names(b) == ["fresh"]


def test_two_servers_seed_one_store_once(make_client, backbone_fingerprint, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    ExpertFile.save(tiny_expert("seeded", threshold=-2.0), seeds / "seeded.safetensors", backbone_fingerprint)
    clients = [make_client(seed_experts=seeds, poll_interval_s=0) for _ in range(2)]
    assert [names(c) for c in clients] == [["seeded"], ["seeded"]]
    assert store_of(clients[0]).versions() == [1]
    # a server that lost the race to seed (version 1 exists by the time it commits) takes the winner's
    again = clients[1].app.state.experts._seed(seeds)
    assert again == store_of(clients[0]).current() and store_of(clients[0]).versions() == [1]


class StandInReplicas:
    """A cluster's ReplicaSet as the plug route sees it: this server and one other replica at `other`."""

    wait_s = 0.5

    def __init__(self) -> None:
        self.served = None
        self.other = 0

    async def versions(self) -> list[dict]:
        return [{"replica": "self", "version": self.served.version}, {"replica": "other", "version": self.other}]


def test_in_a_cluster_a_plug_answers_once_every_replica_serves_it_or_202(
    tiny_model_dir: Path, tmp_path: Path, expert_bytes
) -> None:
    from server.main import create_app
    from tests.server.conftest import LOOPBACK, test_settings

    app = create_app(test_settings(tiny_model_dir, tmp_path, poll_interval_s=0))
    replicas = StandInReplicas()
    app.state.replicas = replicas
    with TestClient(app, client=LOOPBACK) as client:
        replicas.served = app.state.experts
        lagging = upload(client, expert_bytes("slow"))
        assert lagging.status_code == 202, lagging.text
        body = lagging.json()
        assert body["version"] == 1 and body["converged"] is False and body["status"] == "/cluster/versions/1"
        assert body["replicas"] == [{"replica": "self", "version": 1}, {"replica": "other", "version": 0}]
        assert body["name"] == "slow" and names(client) == ["slow"]  # plugged here and in the store all the same

        replicas.other = 99  # a replica ahead counts as serving it
        done = upload(client, expert_bytes("fast", seed=2))
        assert done.status_code == 201 and done.json()["converged"] is True and done.json()["version"] == 2
        assert "status" not in done.json()
        unplugged = client.delete("/experts/slow")
        assert unplugged.status_code == 200
        assert unplugged.json() == {
            "name": "slow",
            "unplugged": True,
            "purged": False,
            "version": 3,
            "converged": True,
            "replicas": [{"replica": "self", "version": 3}, {"replica": "other", "version": 99}],
        }
