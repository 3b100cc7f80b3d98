"""The served expert set (server/served_experts.py) through the app: seeding skips a bad file with a log line
and serves the rest, and a name claimed by several files is seeded from the file named after it (never by file-name
order); copies of one expert under new names are a 201, 409 or 422, never a 500; admission runs on its own worker
thread while decoding goes on; metadata over the format's limits is a 413 before admission; an expert whose
weights combine into non-finite logits is refused by the pinned probe (422) and nothing changes. Disk first, then
memory: a full disk refuses a plug (507) with nothing swapped and an unplug with the expert still plugged, and what
a write killed midway leaves in the store's tmp/ is removed at the next start.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import server.served_experts
from moe import ExpertFile
from server.expert_store import ExpertStore
from tests.server.conftest import REPO
from tests.tiny import tiny_expert


def _upload(client: TestClient, data: bytes, **form) -> object:
    return client.post("/experts", files={"file": ("x.safetensors", data)}, data=form)


def test_a_third_copy_under_a_new_name_is_never_a_500(make_client, expert_bytes) -> None:
    """Admission on: copies score exactly alike, so each new copy steals all of its twins' tokens."""
    client = make_client(max_false_positive_rate=1.0, max_steal_rate=0.5)
    data = expert_bytes("twin")  # an open gate: its examples route to it, so the steal rates are computed
    statuses = [_upload(client, data, name=name).status_code for name in ("first", "second", "third")]
    assert statuses[0] == 201 and all(status in (201, 409, 422) for status in statuses), statuses
    assert client.get("/ready").status_code == 200
    plugged = [e["name"] for e in client.get("/experts").json()]
    assert plugged == [name for name, s in zip(("first", "second", "third"), statuses, strict=True) if s == 201]


def _write_header(data: bytes, change) -> bytes:
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def test_seeding_skips_bad_files_with_a_log_line_and_serves_the_rest(
    make_client, expert_bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    good = expert_bytes("good")
    (seed / "good.safetensors").write_bytes(good)
    bad = {
        "meta-string": _write_header(good, lambda h: h.__setitem__("__metadata__", "x")),
        "meta-list": _write_header(good, lambda h: h.__setitem__("__metadata__", [1])),
        "tensor-string": _write_header(good, lambda h: h.__setitem__("down", "x")),
        "shape-int": _write_header(good, lambda h: h["up"].__setitem__("shape", 5)),
        "layers-string": _write_header(good, lambda h: h["__metadata__"].__setitem__("layers", "5")),
        "nested": b"\x10\x27\x00\x00\x00\x00\x00\x00" + b"[" * 10000,
        "newline-name": _write_header(good, lambda h: h["__metadata__"].__setitem__("name", "x\n")),
        "x\n": expert_bytes("x"),  # a file name ending in a newline: the name inside the file is what counts
        "empty": b"",
    }
    for name, data in bad.items():
        (seed / f"{name}.safetensors").write_bytes(data)
    with caplog.at_level(logging.ERROR, logger="server.served_experts"):
        client = make_client(seed_experts=seed)
    assert sorted(e["name"] for e in client.get("/experts").json()) == ["good", "x"]
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not seeding")]
    for name in bad:
        if name != "x\n":
            assert any(f"{name}.safetensors" in line for line in refused), (name, refused)
    assert client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


def test_a_name_claimed_by_several_files_is_seeded_from_the_file_named_after_it(
    make_client, expert_bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    named = expert_bytes("dup", seed=1)
    (seed / "aaa.safetensors").write_bytes(expert_bytes("dup", seed=2))  # sorts first
    (seed / "dup.safetensors").write_bytes(named)
    (seed / "zzz.safetensors").write_bytes(expert_bytes("dup", seed=3))  # sorts last
    (seed / "o1.safetensors").write_bytes(expert_bytes("orphan", seed=4))  # no file is named orphan.safetensors
    (seed / "o2.safetensors").write_bytes(expert_bytes("orphan", seed=5))
    with caplog.at_level(logging.ERROR, logger="server.served_experts"):
        client = make_client(seed_experts=seed)
    assert [e["name"] for e in client.get("/experts").json()] == ["dup"]
    store = ExpertStore(tmp_path / "experts")
    assert store.read_blob(store.current().get("dup").sha256) == named
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "aaa.safetensors" in messages and "zzz.safetensors" in messages
    assert "not seeding expert 'orphan'" in messages and "o1.safetensors" in messages


def test_admission_runs_on_its_worker_while_decoding_goes_on(make_client, expert_bytes) -> None:
    client = make_client()
    served = client.app.state.experts
    entered, release = threading.Event(), threading.Event()
    threads: list[str] = []
    real_review = served.policy.review

    def review(model, tokenizer, expert, *rest):
        threads.append(threading.current_thread().name)
        entered.set()
        release.wait(60)
        return real_review(model, tokenizer, expert, *rest)

    served.policy.review = review
    plug: dict[str, int] = {}
    plugging = threading.Thread(
        target=lambda: plug.setdefault("status", _upload(client, expert_bytes("slow")).status_code)
    )
    plugging.start()
    assert entered.wait(30)
    started = time.monotonic()
    body = {"prompt": "hi", "max_new_tokens": 8, "min_new_tokens": 8}
    assert client.post("/generate", json=body).status_code == 200  # the engine decodes while admission runs
    assert time.monotonic() - started < 30
    release.set()
    plugging.join(60)
    assert plug == {"status": 201}
    assert threads and threads[0].startswith("plugmoe-admission")


def test_metadata_over_the_limits_is_413_before_admission(make_client, backbone_fingerprint) -> None:
    client = make_client(max_false_positive_rate=0.5)
    data = ExpertFile.to_bytes(tiny_expert("chatty", examples=("short",)), backbone_fingerprint)
    metadata, _ = ExpertFile.read_header(data)
    metadata["examples"] = json.dumps(["Question: how many? " * 2000] * 15)  # as another tool might write
    data = save_safetensors(load_safetensors(data), metadata=metadata)
    reviewed: list[str] = []
    client.app.state.experts.policy.review = lambda *args: reviewed.append("ran")
    response = _upload(client, data)
    assert response.status_code == 413 and response.json()["error"]["type"] == "MetadataTooLargeError"
    assert reviewed == [] and client.get("/experts").json() == []


def test_an_expert_whose_pinned_logits_are_not_finite_is_422_and_nothing_changes(
    client: TestClient, expert_bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ExpertStore(tmp_path / "experts")
    before = store.current()
    monkeypatch.setattr(server.served_experts, "probe_is_finite", lambda model, tokenizer, expert: False)
    response = _upload(client, expert_bytes("overflows"))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"] == "NonFiniteOutputError" and "NaN" in response.json()["detail"]
    assert client.get("/experts").json() == [] and store.current() == before


# --- disk first, then memory: the answer, the model and the store agree --------------------------------------


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch):
    """Every fsync in the store fails as a full disk does (the data never reaches the disk)."""
    state = {"full": False}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if state["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr("server.expert_store.os.fsync", fsync)
    return state


def test_a_full_disk_refuses_the_plug_with_507_and_nothing_swapped(
    make_client, expert_bytes, tmp_path: Path, full_disk: dict
) -> None:
    client = make_client()
    assert _upload(client, expert_bytes("kept")).status_code == 201
    store = ExpertStore(tmp_path / "experts")
    before = store.current()
    full_disk["full"] = True
    response = _upload(client, expert_bytes("new", seed=3))
    assert response.status_code == 507, response.text
    assert (
        response.json()["error"]["type"] == "InsufficientStorageError" and "disk is full" in response.json()["detail"]
    )
    assert [e["name"] for e in client.get("/experts").json()] == ["kept"]  # memory agrees with the answer
    assert store.current() == before  # and so does the disk
    assert list(store.tmp.iterdir()) == [], "the failed write left no temp file"
    replaced = _upload(client, expert_bytes("kept", seed=4), replace="true")
    assert replaced.status_code == 507 and store.current() == before
    full_disk["full"] = False
    assert _upload(client, expert_bytes("new", seed=3)).status_code == 201, "a retry is not a 409"
    restarted = make_client()
    assert [e["name"] for e in restarted.get("/experts").json()] == ["kept", "new"]


def test_a_full_disk_refuses_the_unplug_and_the_expert_stays(
    make_client, expert_bytes, tmp_path: Path, full_disk: dict
) -> None:
    client = make_client()
    assert _upload(client, expert_bytes("stays")).status_code == 201
    full_disk["full"] = True
    response = client.delete("/experts/stays")
    assert response.status_code == 507, response.text
    pinned = {"prompt": "hi", "max_new_tokens": 2, "routing": {"mode": "pin", "expert": "stays"}}
    assert client.post("/generate", json=pinned).status_code == 200, "still plugged in memory"
    assert ExpertStore(tmp_path / "experts").current().names == ("stays",)
    full_disk["full"] = False
    assert [e["name"] for e in make_client().get("/experts").json()] == ["stays"]  # and after a restart


_WRITER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from server.expert_store import ExpertStore

    store = ExpertStore({root!r}).open()
    real_fsync = os.fsync

    def fsync_then_hang(fd):
        real_fsync(fd)
        print("writing", flush=True)
        time.sleep(600)  # killed here: the blob is complete in tmp/, not yet renamed into place

    os.fsync = fsync_then_hang
    store.put_blob(b"x" * (8 << 20))
    """
)


def test_kill_9_mid_write_leaves_nothing_after_a_restart(
    make_client, expert_bytes, tmp_path: Path, tiny_model_dir: Path
) -> None:
    client = make_client()
    assert _upload(client, expert_bytes("before")).status_code == 201
    client.__exit__(None, None, None)
    root = tmp_path / "experts"
    store = ExpertStore(root)
    committed = store.current()
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER.format(repo=str(REPO), root=str(root))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    finally:
        if writer.poll() is None:
            writer.kill()
    stale = list(store.tmp.iterdir())
    assert len(stale) == 1 and stale[0].stat().st_size == 8 << 20, "the kill left a temp file"
    assert store.current() == committed and len(list(store.blobs.iterdir())) == 1

    started = time.monotonic()
    restarted = make_client()
    assert list(store.tmp.iterdir()) == [], "the next start removed it"
    assert [e["name"] for e in restarted.get("/experts").json()] == ["before"]
    assert time.monotonic() - started < 120


def test_a_router_for_the_served_set_is_published_on_the_engine_thread(make_client) -> None:
    """A refit of the set being served (a reconcile to the same version, say) publishes at once, and publishing
    writes the gates decode steps read: it runs between two steps, on the engine thread, not on the fitting one."""
    client = make_client()
    served = client.app.state.experts
    assert served.context_router
    router = object()
    published: list[tuple[object, str]] = []

    class Fitter:
        def fit(self, experts):
            return router

    served._router_fitter = Fitter()
    served.model.offer_router = lambda r: published.append((r, threading.current_thread().name))
    fitting = threading.Thread(target=served._fit_router, args=((),), name="fitting")
    fitting.start()
    fitting.join(30)
    assert published == [(router, "plugmoe-engine")]
