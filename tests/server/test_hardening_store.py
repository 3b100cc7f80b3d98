"""Finding 6 of the hardening review: disk and memory disagreed.

With a full disk the client got a 500 while the expert stayed plugged (gone after a restart, 409 on retry);
kill -9 during a write left a temp file forever. Now the store is written first and the swap follows, so a
full disk is a 507 with nothing plugged (and an unplug that cannot be committed leaves the expert plugged),
and what an interrupted write leaves in tmp/ is removed at the next start.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from server.expert_store import ExpertStore
from tests.server.conftest import REPO


def _upload(client, data: bytes, **form):
    return client.post("/experts", files={"file": ("x.safetensors", data)}, data=form)


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
