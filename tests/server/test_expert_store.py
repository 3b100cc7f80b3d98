"""The expert store: content-addressed blobs, versioned manifests, exactly one winner per version, cleanup, and
clear errors for what is corrupt on disk."""

from __future__ import annotations

import hashlib
import stat
import threading
from pathlib import Path

import pytest

from server.expert_store import ExpertStore, Manifest, ManifestConflictError, ManifestEntry, StoreCorruptError


@pytest.fixture
def store(tmp_path: Path) -> ExpertStore:
    return ExpertStore(tmp_path / "store").open()


def entry(store: ExpertStore, name: str, data: bytes) -> ManifestEntry:
    stored = store.put_blob(data)
    return ManifestEntry(name, stored.sha256, stored.size)


def test_blob_round_trip(store: ExpertStore) -> None:
    data = b"an expert file's bytes"
    stored = store.put_blob(data)
    digest = hashlib.sha256(data).hexdigest()
    assert stored == ManifestEntry("", digest, len(data))
    path = store.blobs / f"{digest}.safetensors"
    assert path.read_bytes() == data and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert store.read_blob(digest) == data
    assert store.put_blob(data) == stored, "the same bytes are stored once"
    assert list(store.blobs.iterdir()) == [path] and list(store.tmp.iterdir()) == [], "no temp file is left"


def test_a_blob_that_does_not_match_its_hash_is_refused(store: ExpertStore) -> None:
    digest = store.put_blob(b"original").sha256
    (store.blobs / f"{digest}.safetensors").write_bytes(b"changed on disk")
    with pytest.raises(StoreCorruptError, match="does not match its hash"):
        store.read_blob(digest)
    with pytest.raises(StoreCorruptError, match="is missing from the store"):
        store.read_blob("0" * 64)


def test_each_commit_creates_the_next_version(store: ExpertStore) -> None:
    assert store.current() == Manifest(0)
    a, b = entry(store, "a", b"aaa"), entry(store, "b", b"bbb")
    first = store.commit(Manifest(0), (a,))
    assert (first.version, first.experts) == (1, (a,)) and first.created
    assert store.current() == first
    second = store.commit(first, first.with_expert(b))
    assert (second.version, second.names) == (2, ("a", "b"))
    third = store.commit(second, second.without("a"))
    assert (third.version, third.names) == (3, ("b",))
    assert store.current() == third
    assert sorted(p.name for p in store.manifests.iterdir()) == ["00000001.json", "00000002.json", "00000003.json"]
    assert Manifest.from_json((store.manifests / "00000002.json").read_text()) == second, "old versions are kept"


def test_two_commits_from_the_same_base_one_wins(store: ExpertStore) -> None:
    base = store.commit(Manifest(0), (entry(store, "a", b"aaa"),))
    mine = store.commit(base, base.with_expert(entry(store, "b", b"bbb")))
    with pytest.raises(ManifestConflictError, match="version 2 was committed by another writer; reload and retry"):
        store.commit(base, base.with_expert(entry(store, "c", b"ccc")))
    assert store.current() == mine


def test_racing_writers_exactly_one_wins(tmp_path: Path) -> None:
    """Eight stores on one directory (as several processes would be) commit version 1 at the same moment."""
    writers = [ExpertStore(tmp_path / "shared").open() for _ in range(8)]
    entries = [entry(store, f"e{i}", f"file {i}".encode()) for i, store in enumerate(writers)]
    barrier, won, lost = threading.Barrier(len(writers)), [], []

    def commit(i: int) -> None:
        barrier.wait()
        try:
            won.append(writers[i].commit(Manifest(0), (entries[i],)))
        except ManifestConflictError:
            lost.append(i)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(len(writers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(won) == 1 and len(lost) == len(writers) - 1
    assert writers[0].current() == won[0] and [p.name for p in writers[0].manifests.iterdir()] == ["00000001.json"]


def test_committing_a_file_that_is_not_stored_writes_nothing(store: ExpertStore) -> None:
    with pytest.raises(StoreCorruptError, match="cannot commit 'ghost': its file"):
        store.commit(Manifest(0), (ManifestEntry("ghost", "0" * 64, 3),))
    assert store.current() == Manifest(0) and list(store.manifests.iterdir()) == []


def test_open_removes_unfinished_temporary_files(tmp_path: Path) -> None:
    store = ExpertStore(tmp_path / "store").open()
    digest = store.put_blob(b"kept").sha256
    store.commit(Manifest(0), (ManifestEntry("kept", digest, 4),))
    (store.tmp / "00000002.json.abc.tmp").write_text("half a manifest")
    (store.tmp / "blob.tmp").write_bytes(b"half a file")
    reopened = ExpertStore(store.root).open()
    assert list(reopened.tmp.iterdir()) == []
    assert reopened.current().names == ("kept",) and reopened.read_blob(digest) == b"kept"


@pytest.mark.parametrize(
    "text", ["{not json", '{"version": 1}', '{"version": 1, "experts": [{"name": "a"}]}', '["a list"]', ""]
)
def test_a_corrupt_manifest_is_a_clear_error(store: ExpertStore, text: str) -> None:
    store.commit(Manifest(0), ())
    (store.manifests / "00000002.json").write_text(text)
    with pytest.raises(StoreCorruptError, match="manifest .*00000002.json is unreadable"):
        store.current()


def test_other_files_beside_the_manifests_are_ignored(store: ExpertStore) -> None:
    first = store.commit(Manifest(0), ())
    for name in ("notes.txt", "2.json", "00000009.json.bak", "latest.json"):
        (store.manifests / name).write_text("not a manifest")
    assert store.current() == first


def test_delete_blob(store: ExpertStore) -> None:
    digest = store.put_blob(b"purge me").sha256
    assert store.delete_blob(digest) is True and store.delete_blob(digest) is False
    with pytest.raises(StoreCorruptError):
        store.read_blob(digest)


def test_manifest_edits_and_json_round_trip() -> None:
    a, b, new_a = ManifestEntry("a", "1" * 64, 1), ManifestEntry("b", "2" * 64, 2), ManifestEntry("a", "3" * 64, 3)
    manifest = Manifest(4, (a, b), "2025-01-01T00:00:00+00:00")
    assert manifest.with_expert(new_a) == (new_a, b), "a replaced entry keeps its place"
    assert manifest.with_expert(ManifestEntry("c", "4" * 64, 4))[-1].name == "c"
    assert manifest.without("a") == (b,) and manifest.without("zzz") == (a, b)
    assert manifest.get("b") == b and manifest.get("zzz") is None
    assert Manifest.from_json(manifest.to_json()) == manifest
