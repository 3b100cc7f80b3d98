"""Where the served expert set persists: content-addressed expert files and versioned manifests.

    <root>/blobs/<sha256>.safetensors     each expert file, named by the SHA-256 of its bytes
    <root>/manifests/<version>.json       expert-set version N: {"version", "experts": [{name, sha256, size}],
                                          "created"}, experts in plug order; the highest version is current
    <root>/tmp/                           files being written (removed at start: a crash leaves nothing)

Writes are atomic: a blob is written to tmp/, fsynced and renamed into place before any manifest names it,
and a manifest is created exclusively (a hard link of a complete temp file, which fails when the version
exists), so a reader never sees a manifest that names a file not yet complete, and of two writers racing
for version N + 1 exactly one wins (the other gets ManifestConflictError).

The server writes here before it swaps an expert in or out, so what the client is told, what is in memory
and what is on disk agree; a restart plugs the current manifest's experts.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST_DIGITS = 8
_MANIFEST_NAME = re.compile(r"^(\d{8})\.json$")


class ManifestConflictError(RuntimeError):
    """Another writer committed the next expert-set version first; read the current one and try again."""


class StoreCorruptError(RuntimeError):
    """A manifest or blob in the store is unreadable or does not match its hash."""


class StoreWriteError(RuntimeError):
    """Writing to the store failed; nothing was committed (the temp file is removed)."""


class InsufficientStorageError(StoreWriteError):
    """The store's disk is full (or over quota); nothing was committed."""


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
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        experts = tuple(ManifestEntry(str(e["name"]), str(e["sha256"]), int(e["size"])) for e in data["experts"])
        return cls(int(data["version"]), experts, str(data.get("created", "")))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ExpertStore:
    """A local directory store (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.blobs, self.manifests, self.tmp = self.root / "blobs", self.root / "manifests", self.root / "tmp"

    def open(self) -> ExpertStore:
        """Create the directories and remove what an interrupted write left in tmp/."""
        for directory in (self.blobs, self.manifests, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)
        stale = list(self.tmp.iterdir())
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            logger.info("removed %d unfinished temporary files from %s", len(stale), self.tmp)
        return self

    # --- reading ------------------------------------------------------------------------------------------

    def current(self) -> Manifest:
        """The highest committed version (version 0 with no experts when nothing was committed yet)."""
        versions = sorted(int(m[1]) for p in self.manifests.glob("*.json") if (m := _MANIFEST_NAME.match(p.name)))
        if not versions:
            return Manifest(0)
        path = self._manifest_path(versions[-1])
        try:
            return Manifest.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise StoreCorruptError(f"manifest {path} is unreadable: {e}") from e

    def read_blob(self, digest: str) -> bytes:
        """An expert file's bytes, checked against its hash."""
        path = self.blobs / f"{digest}.safetensors"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StoreCorruptError(f"expert file {path.name} is missing from the store: {e.strerror or e}") from e
        if sha256(data) != digest:
            raise StoreCorruptError(f"expert file {path.name} does not match its hash (corrupted on disk)")
        return data

    # --- writing ------------------------------------------------------------------------------------------

    def put_blob(self, data: bytes) -> ManifestEntry:
        """Store an expert file (a no-op when the same bytes are stored); returns its entry without a name."""
        digest = sha256(data)
        path = self.blobs / f"{digest}.safetensors"
        if not path.exists():
            self._write(path, data, exclusive=False)
        return ManifestEntry("", digest, len(data))

    def commit(self, base: Manifest, experts: tuple[ManifestEntry, ...]) -> Manifest:
        """Create version base.version + 1 with these experts. Raises ManifestConflictError when another
        writer created that version first (nothing is written then)."""
        for entry in experts:
            if not (self.blobs / f"{entry.sha256}.safetensors").exists():
                raise StoreCorruptError(f"cannot commit {entry.name!r}: its file {entry.sha256} is not stored")
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        manifest = Manifest(base.version + 1, experts, created)
        try:
            self._write(self._manifest_path(manifest.version), manifest.to_json().encode(), exclusive=True)
        except FileExistsError:
            raise ManifestConflictError(
                f"expert-set version {manifest.version} was committed by another writer; reload and retry"
            ) from None
        return manifest

    def delete_blob(self, digest: str) -> bool:
        """Remove a stored file (purge). Older manifests may still name it; only the current one is served."""
        path = self.blobs / f"{digest}.safetensors"
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def _manifest_path(self, version: int) -> Path:
        return self.manifests / f"{version:0{MANIFEST_DIGITS}d}.json"

    def _write(self, path: Path, data: bytes, exclusive: bool) -> None:
        """Write through a complete, fsynced temp file; then rename (replace) or hard-link (exclusive create).

        Raises FileExistsError (exclusive, the path exists), InsufficientStorageError (disk full) or
        StoreWriteError; in every case the temp file is gone and the target is untouched."""
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=f"{path.name}.", suffix=".tmp")
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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
