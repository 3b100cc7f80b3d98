"""Where the served expert set persists: content-addressed expert files and versioned manifests, behind a URL.

    <root>/blobs/<sha256>.safetensors     each expert file, named by the SHA-256 of its bytes
    <root>/manifests/<version>.json       expert-set version N: {"version", "experts": [{name, sha256, size}],
                                          "created"}, experts in plug order; the highest version is current
    <root>/tmp/                           (local directories only) files being written

The root is a local directory (the default; a path or file:// URL) or any fsspec URL: `s3://bucket/prefix`
through s3fs, `memory://`, `gs://` ... (the backend's package must be installed). Every server and every
replica of a cluster reads the same store, so one code path serves one process or many.

Writes are atomic: a blob is complete in the store before any manifest names it, and a manifest is created
exclusively (compare-and-swap on the version number), so a reader never sees a manifest that names a file
not yet complete, and of two writers racing for version N + 1 exactly one wins (the other gets
ManifestConflictError). Local directory: a complete, fsynced temp file renamed into place (blob) or
hard-linked (manifest: the link fails when the version exists). S3: one PUT is atomic, and a manifest is a
PUT with `If-None-Match: *` (s3fs's pipe_file(mode="create"); the losing writer gets 412). Other fsspec
backends use their own pipe_file(mode="create"), which fsspec documents as atomic only on S3: with them,
plug through one server at a time.

Versions only grow, one at a time (version N + 1 is created only on top of N), so a reader that knows
version N finds newer ones by probing N + 1, N + 2 ... (one read each; `newer_than`), without listing.

The server writes here before it swaps an expert in or out, so what the client is told, what is in memory
and what is on disk agree; a restart plugs the current manifest's experts.

Cleaning up (nothing else ever deletes): an unplug with purge deletes the expert's file unless the new set
uses it, and so does a purge of an expert unplugged earlier (every file a manifest ever named it by, less
those the current set uses); the garbage collector (collect_garbage, --store-gc-keep-versions K) deletes
every file that none of the newest K manifests names. Manifests are never deleted (a reader that is behind
finds newer versions by probing, one at a time). The collector is safe beside other writers: a plug stores
(or, reusing a stored file, touches) its file right before it commits, so a file written or reused within
the grace period (--store-gc-grace-s) is never collected; manifests committed while the collector runs are
read again before anything is deleted, and a file's age is read again right before it is deleted.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST_DIGITS = 8
_MANIFEST_NAME = re.compile(r"^(\d{8})\.json$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
STALE_TMP_S = 600  # a temp file this old is a crashed write's leftover, not another server's write in progress
# fsspec backends whose pipe_file(mode="create") is an atomic create-only write (a conditional PUT)
ATOMIC_CREATE_PROTOCOLS = frozenset({"s3", "s3a"})


class ManifestConflictError(RuntimeError):
    """Another writer committed the next expert-set version first; read the current one and try again."""


class StoreCorruptError(RuntimeError):
    """A manifest or blob in the store is unreadable or does not match its hash."""


class StoreUnavailableError(RuntimeError):
    """The store cannot be reached or read right now (network, credentials, permissions); a retry may work."""


class StoreWriteError(RuntimeError):
    """Writing to the store failed; nothing was committed (the temp file is removed)."""


class InsufficientStorageError(StoreWriteError):
    """The store's disk is full (or over quota); nothing was committed."""


@dataclass(frozen=True)
class StoredFile:
    """An expert file in the store: its hash, size, and seconds since it was written or last reused (None
    when the backend does not say)."""

    sha256: str
    size: int
    age_s: float | None


@dataclass(frozen=True)
class StoreUsage:
    files: int
    bytes: int
    manifests: int


@dataclass(frozen=True)
class GarbageReport:
    """What a garbage collection did: the newest version it read, the versions whose files it kept, what it
    deleted, and what the store holds after it."""

    version: int
    kept_versions: list[int]
    deleted: list[str]
    freed_bytes: int
    kept_young: int  # unreferenced files left because they were written or reused within the grace period
    files: int
    bytes: int


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """One version of the expert set: names, their files' hashes, in plug order (version 0: nothing yet)."""

    version: int
    experts: tuple[ManifestEntry, ...] = ()
    created: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.experts)

    def get(self, name: str) -> ManifestEntry | None:
        return next((e for e in self.experts if e.name == name), None)

    def with_expert(self, entry: ManifestEntry) -> tuple[ManifestEntry, ...]:
        """The experts after plugging `entry` (in place of an entry of the same name, else appended)."""
        if self.get(entry.name) is not None:
            return tuple(entry if e.name == entry.name else e for e in self.experts)
        return (*self.experts, entry)

    def without(self, name: str) -> tuple[ManifestEntry, ...]:
        return tuple(e for e in self.experts if e.name != name)

    def to_json(self) -> str:
        return (
            json.dumps(
                {"version": self.version, "experts": [asdict(e) for e in self.experts], "created": self.created},
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        data = json.loads(text)
        experts = tuple(ManifestEntry(str(e["name"]), str(e["sha256"]), int(e["size"])) for e in data["experts"])
        return cls(int(data["version"]), experts, str(data.get("created", "")))

    def check(self, version: int) -> None:
        """Raise ValueError unless this is a well-formed manifest for `version`."""
        if self.version != version:
            raise ValueError(f"the file of version {version} says it is version {self.version}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"it names an expert twice: {list(self.names)}")
        for entry in self.experts:
            if not _SHA256.match(entry.sha256) or entry.size < 0 or not entry.name:
                raise ValueError(f"entry {entry} is not a name, a SHA-256 in hex and a size")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_local(url: str | Path) -> bool:
    """A plain path or a file:// URL (stored through the local-directory code below)."""
    return isinstance(url, PurePath) or "://" not in str(url) or str(url).startswith("file://")


class _LocalFiles:
    """Files in a local directory: atomic replace through a temp file and rename, create-only through link."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def read(self, path: PurePath) -> bytes:
        return Path(path).read_bytes()

    def exists(self, path: PurePath) -> bool:
        return Path(path).exists()

    def names(self, directory: PurePath) -> list[str]:
        try:
            return [p.name for p in Path(directory).iterdir()]
        except FileNotFoundError:
            return []

    def listing(self, directory: PurePath) -> list[tuple[str, int, float | None]]:
        """(name, size, seconds since it was modified) of each file in `directory`."""
        now, found = time.time(), []
        for name in self.names(directory):
            try:
                info = (Path(directory) / name).stat()
            except FileNotFoundError:  # deleted since it was listed
                continue
            found.append((name, info.st_size, now - info.st_mtime))
        return found

    def age_s(self, path: PurePath) -> float | None:
        try:
            return time.time() - Path(path).stat().st_mtime
        except FileNotFoundError:
            return None

    def touch(self, path: PurePath, data: bytes) -> None:
        """Mark a stored file as just used (its mtime); rewrite it when it belongs to another user."""
        try:
            os.utime(path)
        except PermissionError:
            self.write(path, data, exclusive=False)

    def write(self, path: PurePath, data: bytes, exclusive: bool) -> None:
        """Write through a complete, fsynced temp file; then rename (replace) or hard-link (exclusive create).

        Raises FileExistsError (exclusive, the path exists), InsufficientStorageError (disk full) or
        StoreWriteError; in every case the temp file is gone and the target is untouched. The temp file's
        name says which process writes it (TMP_OWNER), so a server starting beside a live writer on a shared
        directory leaves it alone."""
        path = Path(path)
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=f"{path.name}.{_owner()}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a server run as another user must read them
            if exclusive:
                os.link(tmp, path)  # fails with FileExistsError when the path exists: create-only
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorageError(
                    f"the expert store's disk is full ({e.strerror}); nothing was changed. Free space in the "
                    "expert store's volume and retry"
                ) from e
            raise StoreWriteError(f"writing to the expert store failed ({e.strerror or e}); nothing was changed") from e
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def delete(self, path: PurePath) -> bool:
        path = Path(path)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed


class _FsspecFiles:
    """Files behind an fsspec filesystem (object stores). Every call reads the store, never fsspec's listing
    cache; any failure other than a missing or existing file is a StoreUnavailableError."""

    def __init__(self, fs: Any, url: str) -> None:
        self.fs = fs
        self.url = url

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError):
            raise
        except Exception as e:  # network, credentials, throttling: the caller retries or answers 503
            raise StoreUnavailableError(f"expert store {self.url}: {what} failed: {type(e).__name__}: {e}") from e

    def read(self, path: PurePath) -> bytes:
        self.fs.invalidate_cache(str(path))
        return self._call(f"reading {path}", self.fs.cat_file, str(path))

    def exists(self, path: PurePath) -> bool:
        self.fs.invalidate_cache(str(path))
        return self._call(f"looking up {path}", self.fs.exists, str(path))

    def names(self, directory: PurePath) -> list[str]:
        try:
            listed = self._call(f"listing {directory}", self.fs.ls, str(directory), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return [PurePosixPath(p).name for p in listed]

    def listing(self, directory: PurePath) -> list[tuple[str, int, float | None]]:
        """(name, size, seconds since it was written, None when the backend does not say) of each file."""
        try:
            listed = self._call(f"listing {directory}", self.fs.ls, str(directory), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return [
            (PurePosixPath(info["name"]).name, int(info.get("size") or 0), _age_s(info))
            for info in listed
            if info.get("type", "file") == "file"
        ]

    def age_s(self, path: PurePath) -> float | None:
        self.fs.invalidate_cache(str(path))
        try:
            return _age_s(self._call(f"looking up {path}", self.fs.info, str(path)))
        except FileNotFoundError:
            return None

    def touch(self, path: PurePath, data: bytes) -> None:
        """Mark a stored file as just used: an object store has no mtime to set, so it is written again (one
        atomic PUT of the same bytes)."""
        self.write(path, data, exclusive=False)

    def write(self, path: PurePath, data: bytes, exclusive: bool) -> None:
        mode = "create" if exclusive else "overwrite"
        self._call(f"writing {path}", self.fs.pipe_file, str(path), data, mode=mode)

    def delete(self, path: PurePath) -> bool:
        if not self.exists(path):  # an object store's delete succeeds on a missing key
            return False
        try:
            self._call(f"deleting {path}", self.fs.rm_file, str(path))
        except FileNotFoundError:
            return False
        return True


class ExpertStore:
    """The store at `url` (see the module docstring): a local directory, or an fsspec URL with its
    `storage_options` (for s3: endpoint_url, key, secret, client_kwargs ...; credentials may also come from
    the usual AWS environment variables and profiles)."""

    def __init__(self, url: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(url)
        if is_local(url):
            path = self.url.removeprefix("file://") if isinstance(url, str) else url
            self.root: PurePath = Path(path).expanduser()
            self.tmp: PurePath = self.root / "tmp"
            self.protocol = "file"
            self._files: _LocalFiles | _FsspecFiles = _LocalFiles(Path(self.tmp))
        else:
            import fsspec

            # never answer from fsspec's listing cache: s3fs would say a manifest written since the last
            # listing does not exist
            options = {"use_listings_cache": False, **(storage_options or {})}
            fs, root = fsspec.core.url_to_fs(self.url, **options)
            protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
            self.root = PurePosixPath(root.rstrip("/") or "/")
            self.tmp = self.root / "tmp"  # unused: an object PUT is atomic
            self.protocol = protocols[0]
            self._files = _FsspecFiles(fs, self.url)
        self.blobs, self.manifests = self.root / "blobs", self.root / "manifests"

    @property
    def is_local(self) -> bool:
        return isinstance(self._files, _LocalFiles)

    def __repr__(self) -> str:
        return f"ExpertStore({self.url!r})"

    def open(self) -> ExpertStore:
        """Local: create the directories and remove what an interrupted write left in tmp/: every temp file
        but those of live writers (a server of this host that still runs, or of another host sharing the
        directory, for STALE_TMP_S)."""
        if not self.is_local:
            if self.protocol not in ATOMIC_CREATE_PROTOCOLS:
                logger.warning(
                    "the %s store %s may not create manifests atomically: plug through one server at a time",
                    self.protocol,
                    self.url,
                )
            return self
        for directory in (self.blobs, self.manifests, self.tmp):
            Path(directory).mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - STALE_TMP_S
        stale = [p for p in Path(self.tmp).iterdir() if _mtime(p) < cutoff or _abandoned(p.name)]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            logger.info("removed %d unfinished temporary files from %s", len(stale), self.tmp)
        return self

    # --- reading ------------------------------------------------------------------------------------------

    def versions(self) -> list[int]:
        """Every committed version, ascending (one listing of manifests/)."""
        return sorted(int(m[1]) for n in self._files.names(self.manifests) if (m := _MANIFEST_NAME.match(n)))

    def current(self) -> Manifest:
        """The highest committed version (version 0 with no experts when nothing was committed yet)."""
        versions = self.versions()
        if not versions:
            return Manifest(0)
        manifest = self.read_manifest(versions[-1])
        if manifest is None:  # listed, then gone: someone is deleting manifests
            raise StoreCorruptError(f"manifest {versions[-1]} of {self.url} disappeared while it was read")
        return manifest

    def newer_than(self, version: int) -> Manifest | None:
        """The newest version above `version`, or None when there is none (probes version + 1, + 2 ...)."""
        newest = None
        while (found := self.read_manifest(version + 1)) is not None:
            newest, version = found, version + 1
        return newest

    def read_manifest(self, version: int) -> Manifest | None:
        """Version `version`, or None when it does not exist."""
        path = self._manifest_path(version)
        try:
            text = self._files.read(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreCorruptError(f"manifest {path} is unreadable: {e}") from e
        try:
            manifest = Manifest.from_json(text)
            manifest.check(version)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise StoreCorruptError(f"manifest {path} is unreadable: {e}") from e
        return manifest

    def read_blob(self, digest: str) -> bytes:
        """An expert file's bytes, checked against its hash."""
        path = self._blob_path(digest)
        try:
            data = self._files.read(path)
        except OSError as e:
            raise StoreCorruptError(f"expert file {path.name} is missing from the store: {e.strerror or e}") from e
        if sha256(data) != digest:
            raise StoreCorruptError(f"expert file {path.name} does not match its hash (corrupted in the store)")
        return data

    # --- writing ------------------------------------------------------------------------------------------

    def put_blob(self, data: bytes) -> ManifestEntry:
        """Store an expert file (when the same bytes are stored, they are only touched: the garbage collector
        leaves a file reused this recently alone); returns its entry without a name."""
        digest = sha256(data)
        path = self._blob_path(digest)
        if self._files.exists(path):
            self._files.touch(path, data)
        else:
            self._files.write(path, data, exclusive=False)
        return ManifestEntry("", digest, len(data))

    def commit(self, base: Manifest, experts: tuple[ManifestEntry, ...]) -> Manifest:
        """Create version base.version + 1 with these experts. Raises ManifestConflictError when another
        writer created that version first (nothing is written then)."""
        for entry in experts:
            if not self._files.exists(self._blob_path(entry.sha256)):
                raise StoreCorruptError(f"cannot commit {entry.name!r}: its file {entry.sha256} is not stored")
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        manifest = Manifest(base.version + 1, experts, created)
        manifest.check(manifest.version)  # raises ValueError: a writer never commits a malformed manifest
        try:
            self._files.write(self._manifest_path(manifest.version), manifest.to_json().encode(), exclusive=True)
        except FileExistsError:
            raise ManifestConflictError(
                f"expert-set version {manifest.version} was committed by another writer; reload and retry"
            ) from None
        return manifest

    def delete_blob(self, digest: str) -> bool:
        """Remove a stored file (purge). Older manifests may still name it; only the current one is served."""
        return self._files.delete(self._blob_path(digest))

    # --- cleaning up --------------------------------------------------------------------------------------

    def stored_files(self) -> list[StoredFile]:
        """Every expert file in blobs/ (one listing)."""
        found = []
        for name, size, age in self._files.listing(self.blobs):
            digest = name.removesuffix(".safetensors")
            if name.endswith(".safetensors") and _SHA256.match(digest):
                found.append(StoredFile(digest, size, age))
        return found

    def usage(self) -> StoreUsage:
        """How many expert files and bytes the store holds, and how many manifests (two listings)."""
        files = self.stored_files()
        return StoreUsage(len(files), sum(f.size for f in files), len(self.versions()))

    def files_named(self, name: str) -> set[str]:
        """The hash of every file any manifest named `name` by (reads every manifest: for a purge of an
        expert unplugged earlier)."""
        found = set()
        for version in self.versions():
            manifest = self.read_manifest(version)
            entry = manifest.get(name) if manifest is not None else None
            if entry is not None:
                found.add(entry.sha256)
        return found

    def collect_garbage(self, keep_versions: int, grace_s: float) -> GarbageReport:
        """Delete every expert file that none of the newest `keep_versions` manifests names and that was not
        written or reused within `grace_s` seconds (see the module docstring for why this is safe beside other
        writers). A manifest of those versions that cannot be read raises: nothing is deleted on a guess."""
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        versions = self.versions()
        newest = versions[-1] if versions else 0
        kept = [v for v in versions if v > newest - keep_versions]
        referenced = set()
        for version in kept:
            manifest = self.read_manifest(version)
            if manifest is None:
                raise StoreCorruptError(f"manifest {version} of {self.url} disappeared while it was read")
            referenced |= {e.sha256 for e in manifest.experts}
        stored = self.stored_files()
        unreferenced = [f for f in stored if f.sha256 not in referenced]
        candidates = [f for f in unreferenced if _older_than(f.age_s, grace_s)]
        # a writer may have committed since the listing: what its manifests name is kept too
        while (manifest := self.read_manifest(newest + 1)) is not None:
            referenced |= {e.sha256 for e in manifest.experts}
            newest, kept = newest + 1, [*kept, newest + 1]
        deleted, freed = [], 0
        for file in candidates:
            path = self._blob_path(file.sha256)
            # its age read again right before the delete: a plug that reuses it touches it first
            if file.sha256 in referenced or not _older_than(self._files.age_s(path), grace_s):
                continue
            if self._files.delete(path):
                deleted.append(file.sha256)
                freed += file.size
        if deleted:
            version = newest
            while (manifest := self.read_manifest(version + 1)) is not None:
                version += 1
                lost = set(deleted) & {e.sha256 for e in manifest.experts}
                if lost:  # a writer committed a deleted file in the instant between the last check and the delete
                    logger.error(
                        "the garbage collector deleted %s, which expert-set version %d (committed meanwhile) "
                        "names; plug those experts again",
                        sorted(lost),
                        version,
                    )
            logger.info("garbage collection deleted %d expert files (%d bytes) of %s", len(deleted), freed, self.url)
        remaining = [f for f in stored if f.sha256 not in set(deleted)]
        return GarbageReport(
            version=newest,
            kept_versions=kept,
            deleted=deleted,
            freed_bytes=freed,
            kept_young=len(unreferenced) - len(candidates),
            files=len(remaining),
            bytes=sum(f.size for f in remaining),
        )

    def _blob_path(self, digest: str) -> PurePath:
        return self.blobs / f"{digest}.safetensors"

    def _manifest_path(self, version: int) -> PurePath:
        return self.manifests / f"{version:0{MANIFEST_DIGITS}d}.json"


_TMP_OWNER = re.compile(r"\.pid(\d+)@([^/]+?)\.[^.]+\.tmp$")


def _owner() -> str:
    """The writing process, as its temp files name it: pid<pid>@<host>."""
    return f"pid{os.getpid()}@{socket.gethostname()}"


def _abandoned(name: str) -> bool:
    """Whether a temp file's writer is known to be gone: a process of this host that no longer runs, or an
    unnamed writer (not a server's write in progress). Another host's writer is judged by age (STALE_TMP_S)."""
    match = _TMP_OWNER.search(name)
    if match is None:
        return True
    if match[2] != socket.gethostname():
        return False
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs, as another user
        return False
    return False


def _older_than(age_s: float | None, grace_s: float) -> bool:
    """Whether a file of this age may be collected (an unknown age only with no grace period at all)."""
    return grace_s == 0 if age_s is None else age_s >= grace_s


def _age_s(info: dict[str, Any]) -> float | None:
    """Seconds since an fsspec listing entry was written: s3's LastModified, or mtime / created."""
    stamp = info.get("LastModified", info.get("mtime", info.get("created")))
    if isinstance(stamp, dt.datetime):
        stamp = stamp.timestamp()
    return time.time() - float(stamp) if isinstance(stamp, (int, float)) else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
