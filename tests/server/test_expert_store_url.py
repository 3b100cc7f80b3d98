"""The expert store behind a URL: the same contract on a local directory and on a real S3 API (moto's server on
loopback, through s3fs): content-addressed blobs, create-only versioned manifests, atomic compare-and-swap."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from server.expert_store import (
    STALE_TMP_S,
    ExpertStore,
    Manifest,
    ManifestConflictError,
    ManifestEntry,
    StoreCorruptError,
    StoreUnavailableError,
    sha256,
)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ExpertStore:
    if request.param == "local":
        return ExpertStore(tmp_path / "store").open()
    url, options = request.getfixturevalue("s3_store_url")
    return ExpertStore(url, options).open()


def entry(store: ExpertStore, name: str, data: bytes) -> ManifestEntry:
    stored = store.put_blob(data)
    return ManifestEntry(name, stored.sha256, stored.size)


def test_commit_read_and_probe_forward(store: ExpertStore) -> None:
    assert store.current() == Manifest(0) and store.newer_than(0) is None
    first = store.commit(Manifest(0), (entry(store, "math", b"math bytes"),))
    assert first.version == 1 and store.current() == first
    assert store.read_blob(first.experts[0].sha256) == b"math bytes"
    second = store.commit(first, (*first.experts, entry(store, "code", b"code bytes")))
    third = store.commit(second, second.without("math"))
    assert store.versions() == [1, 2, 3]
    assert store.newer_than(0) == third and store.newer_than(1) == third and store.newer_than(3) is None
    assert third.names == ("code",) and store.read_manifest(2).names == ("math", "code")
    assert store.read_manifest(9) is None


def test_a_second_reader_sees_versions_committed_after_it_listed(store: ExpertStore) -> None:
    """Two servers' views of one store (on S3: separate filesystem objects, as in separate processes)."""
    if store.is_local:
        other = ExpertStore(store.url)
    else:
        other = ExpertStore(store.url, {**store._files.fs.storage_options, "skip_instance_cache": True})
    first = store.commit(Manifest(0), (entry(store, "math", b"m"),))
    assert other.current() == first  # lists manifests/
    second = store.commit(first, (*first.experts, entry(store, "code", b"c")))
    assert other.newer_than(1) == second and other.current() == second


def test_same_bytes_are_stored_once(store: ExpertStore) -> None:
    a, b = store.put_blob(b"same"), store.put_blob(b"same")
    assert a == b and a.sha256 == sha256(b"same") and a.size == 4


def test_a_stale_base_conflicts_and_writes_nothing(store: ExpertStore) -> None:
    first = store.commit(Manifest(0), (entry(store, "math", b"m"),))
    with pytest.raises(ManifestConflictError, match="version 1 was committed by another writer"):
        store.commit(Manifest(0), (entry(store, "code", b"c"),))
    assert store.current() == first and store.versions() == [1]


def test_a_manifest_never_names_a_missing_file_or_a_name_twice(store: ExpertStore) -> None:
    with pytest.raises(StoreCorruptError, match="is not stored"):
        store.commit(Manifest(0), (ManifestEntry("ghost", "0" * 64, 1),))
    twice = entry(store, "twice", b"t")
    with pytest.raises(ValueError, match="names an expert twice"):
        store.commit(Manifest(0), (twice, twice))
    assert store.current() == Manifest(0)


def test_a_corrupt_blob_or_manifest_is_reported(store: ExpertStore) -> None:
    good = store.commit(Manifest(0), (entry(store, "math", b"the real bytes"),))
    digest = good.experts[0].sha256
    store._files.write(store._blob_path(digest), b"flipped bytes", exclusive=False)
    with pytest.raises(StoreCorruptError, match="does not match its hash"):
        store.read_blob(digest)
    with pytest.raises(StoreCorruptError, match="missing from the store"):
        store.read_blob("1" * 64)
    store._files.write(store._manifest_path(2), b"{not json", exclusive=True)
    with pytest.raises(StoreCorruptError, match="unreadable"):
        store.current()
    duplicate = {"version": 3, "experts": [{"name": "a", "sha256": digest, "size": 1}] * 2}
    store._files.write(store._manifest_path(3), json.dumps(duplicate).encode(), exclusive=True)
    with pytest.raises(StoreCorruptError, match="names an expert twice"):
        store.newer_than(2)
    mislabelled = {"version": 7, "experts": []}
    store._files.write(store._manifest_path(4), json.dumps(mislabelled).encode(), exclusive=True)
    with pytest.raises(StoreCorruptError, match="says it is version 7"):
        store.read_manifest(4)


def race(store: ExpertStore, writers: int) -> list[Manifest | Exception]:
    """`writers` threads read the same version, then all commit the next one at once."""
    base = store.current()
    entries = [entry(store, f"v{base.version}-{i}", f"bytes of {base.version}, {i}".encode()) for i in range(writers)]
    barrier = threading.Barrier(writers)
    results: list[Manifest | Exception] = [None] * writers  # type: ignore[list-item]

    def commit(i: int) -> None:
        barrier.wait()
        try:
            results[i] = store.commit(base, (*base.experts, entries[i]))
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


@pytest.mark.parametrize("writers", [2, 6])
def test_racing_writers_exactly_one_wins(store: ExpertStore, writers: int) -> None:
    for round_ in range(5):
        results = race(store, writers)
        won = [r for r in results if isinstance(r, Manifest)]
        lost = [r for r in results if isinstance(r, ManifestConflictError)]
        assert len(won) == 1 and len(lost) == writers - 1, results
        current = store.current()
        assert current == won[0] and current.version == round_ + 1
        assert len(current.names) == round_ + 1  # each round adds the winner's expert to the last winner's set
        for e in current.experts:
            store.read_blob(e.sha256)


def test_a_reader_never_sees_a_manifest_naming_an_incomplete_file(store: ExpertStore) -> None:
    """Readers poll while a writer stores big files and commits them: every manifest they see names files
    that are complete (their bytes match their hashes)."""
    last = 6
    deadline = time.monotonic() + 60
    seen: list[list[int]] = [[], []]
    problems: list[str] = []

    def read(mine: list[int]) -> None:
        while (not mine or mine[-1] < last) and time.monotonic() < deadline:
            newest = store.newer_than(mine[-1] if mine else 0)
            if newest is None:
                continue
            for e in newest.experts:
                try:
                    assert len(store.read_blob(e.sha256)) == e.size
                except (StoreCorruptError, AssertionError) as error:
                    problems.append(f"version {newest.version}: {error}")
            mine.append(newest.version)

    readers = [threading.Thread(target=read, args=(mine,)) for mine in seen]
    for reader in readers:
        reader.start()
    manifest = store.current()
    for i in range(last):
        data = os.urandom(1 << 20) + bytes([i])  # 1 MiB: a write that takes a while
        manifest = store.commit(manifest, (*manifest.experts, entry(store, f"e{i}", data)))
    for reader in readers:
        reader.join(60)
    assert not problems and all(mine and mine[-1] == last for mine in seen), (problems, seen)


def test_purge_deletes_the_file(store: ExpertStore) -> None:
    stored = store.put_blob(b"to purge")
    assert store.delete_blob(stored.sha256) is True and store.delete_blob(stored.sha256) is False
    with pytest.raises(StoreCorruptError):
        store.read_blob(stored.sha256)


def test_an_unreachable_s3_store_is_unavailable_not_corrupt() -> None:
    with __import__("socket").socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "k",
        "secret": "s",
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
        "retries": 1,
    }
    store = ExpertStore("s3://nowhere/experts", options).open()
    with pytest.raises(StoreUnavailableError, match="s3://nowhere/experts"):
        store.current()
    with pytest.raises(StoreUnavailableError):
        store.put_blob(b"x")


def test_local_urls_and_leftover_temp_files(tmp_path: Path) -> None:
    """Servers sharing a directory: a start removes what crashed writers left, never a live writer's file."""
    root = tmp_path / "store"
    assert ExpertStore(f"file://{root}").is_local and ExpertStore(str(root)).root == root
    store = ExpertStore(root).open()
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    tmp = Path(store.tmp)
    files = {
        "live here": tmp / f"x.safetensors.pid{live.pid}@{host}.abc123.tmp",
        "dead here": tmp / f"y.safetensors.pid{dead.pid}@{host}.def456.tmp",
        "elsewhere": tmp / "z.safetensors.pid1@another-host.ghi789.tmp",
        "elsewhere, old": tmp / "w.safetensors.pid1@another-host.jkl012.tmp",
        "unnamed": tmp / "half.tmp",
    }
    try:
        for path in files.values():
            path.write_bytes(b"partial")
        os.utime(files["elsewhere, old"], (time.time() - STALE_TMP_S - 5,) * 2)
        ExpertStore(root).open()
        kept = {label for label, path in files.items() if path.exists()}
        assert kept == {"live here", "elsewhere"}
    finally:
        live.kill()
        live.wait(10)
    ExpertStore(root).open()
    assert not files["live here"].exists()  # its writer is gone now


def test_other_fsspec_backends_work_and_are_flagged(caplog: pytest.LogCaptureFixture) -> None:
    """memory:// (fsspec's in-process filesystem) stands for any other backend: the store works through it,
    and open() warns that its create-only write may not be atomic."""
    store = ExpertStore(f"memory://plugmoe-{os.getpid()}-{time.monotonic_ns()}/experts")
    with caplog.at_level("WARNING", logger="server.expert_store"):
        store.open()
    assert "may not create manifests atomically" in caplog.text
    first = store.commit(Manifest(0), (entry(store, "math", b"m"),))
    assert store.current() == first and store.newer_than(0) == first
    with pytest.raises(ManifestConflictError):
        store.commit(Manifest(0), ())
