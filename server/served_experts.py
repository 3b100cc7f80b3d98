"""The served expert set: plug and unplug through the store, the admission policy and the engine.

    plug:   validate the file (moe.file) -> admission (server.admission_policy; in repair mode it may raise the
            candidate's thresholds, and the repaired file is what is stored) -> store the file and commit
            the next expert-set version (server.expert_store) -> swap it in (Engine.plug, between two steps)
    unplug: commit the version without it -> swap it out (Engine.unplug)
    start:  plug the store's current version (seeded from --seed-experts on first start)

Disk first, then memory: a plug that cannot be stored is refused before anything is swapped, so the
client's answer, the model and the store always agree. One plug or unplug runs at a time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

from moe import Expert, ExpertFile, ExpertFileError, ExpertNameTakenError, UnknownExpertError
from server.admission_policy import AdmissionPolicy
from server.engine import Engine
from server.errors import AdmissionRejectedError
from server.expert_sources import fetch_source
from server.expert_store import ExpertStore, Manifest, ManifestEntry, StoreCorruptError
from server.metrics import Metrics

logger = logging.getLogger(__name__)


class ServedExperts:
    def __init__(self, engine: Engine, store: ExpertStore, policy: AdmissionPolicy, metrics: Metrics) -> None:
        self.engine = engine
        self.store = store
        self.policy = policy
        self.metrics = metrics
        self.manifest = Manifest(0)
        self.plugged_at: dict[str, str] = {}
        self._lock = asyncio.Lock()

    @property
    def model(self):
        return self.engine.model

    # --- start --------------------------------------------------------------------------------------------

    def load(self, seed_dir: Path | None = None) -> list[str]:
        """Plug the store's current expert set (before the engine starts); on first start, seed it from
        `seed_dir`. A file that cannot be plugged is logged and skipped, so one bad file cannot keep the
        server down."""
        self.store.open()
        self.manifest = self.store.current()
        if self.manifest.version == 0 and seed_dir is not None:
            self.manifest = self._seed(seed_dir)
        names = []
        for entry in self.manifest.experts:
            try:
                expert = ExpertFile.load(self.store.read_blob(entry.sha256), self.model.fingerprint, entry.name)
                self.model.plug(expert)
            except (ExpertFileError, StoreCorruptError, ValueError) as e:
                logger.error("not plugging %r from expert-set version %d: %s", entry.name, self.manifest.version, e)
                continue
            self._plugged(expert)
            names.append(expert.name)
        logger.info(
            "plugged %d experts from %s (version %d): %s", len(names), self.store.root, self.manifest.version, names
        )
        return names

    def _seed(self, seed_dir: Path) -> Manifest:
        """Version 1 of the store: every valid expert file in seed_dir, in file-name order."""
        entries: list[ManifestEntry] = []
        for path in sorted(Path(seed_dir).glob("*.safetensors")):
            try:
                data = path.read_bytes()
                expert = ExpertFile.load(data, self.model.fingerprint)
            except (OSError, ExpertFileError, ValueError) as e:
                logger.error("not seeding %s: %s", path, e)
                continue
            if any(e.name == expert.name for e in entries):
                logger.error("not seeding %s: its expert is named %r, like an earlier file's", path, expert.name)
                continue
            if path.stem != expert.name:
                logger.warning("seeding %s as %r, the name inside the file", path, expert.name)
            stored = self.store.put_blob(data)
            entries.append(ManifestEntry(expert.name, stored.sha256, stored.size))
        if not entries:
            return Manifest(0)
        manifest = self.store.commit(Manifest(0), tuple(entries))
        logger.info("seeded the expert store with %s from %s", list(manifest.names), seed_dir)
        return manifest

    # --- plug / unplug ------------------------------------------------------------------------------------

    async def plug_bytes(self, data: bytes, name: str | None, replace: bool) -> tuple[Expert, dict | None, bool]:
        """Validate, admit, store, swap. Returns (expert, admission report or None, replaced)."""
        action = "replace" if replace else "plug"
        start = time.perf_counter()
        async with self._lock:
            try:
                expert = await asyncio.to_thread(ExpertFile.load, data, self.model.fingerprint, name)
                replaced = expert.name in self.model.plugged
                if replaced and not replace:  # fail before the admission report: it is the expensive part
                    raise ExpertNameTakenError(
                        f"an expert named {expert.name!r} is already plugged; unplug it first, pass replace, "
                        "or choose another name"
                    )
                action = "replace" if replaced else "plug"
                expert, report = await asyncio.to_thread(self.policy.review, self.model, self.engine.tokenizer, expert)
                repaired = report is not None and report.get("repair") is not None
                if repaired or (name is not None and name != ExpertFile.read_header(data)[0].get("name")):
                    # the stored file is what is plugged: its name, and the thresholds the repair raised
                    data = ExpertFile.to_bytes(expert, self.model.fingerprint)
                stored = await asyncio.to_thread(self.store.put_blob, data)
                entry = ManifestEntry(expert.name, stored.sha256, stored.size)
                before = self.manifest
                self.manifest = await asyncio.to_thread(self.store.commit, before, before.with_expert(entry))
                try:
                    plugged = await self.engine.plug(expert, replace=replace)
                except BaseException:  # disk said plugged, memory did not take it: put the old set back on disk
                    self.manifest = await asyncio.to_thread(self.store.commit, self.manifest, before.experts)
                    raise
            except (ExpertFileError, ExpertNameTakenError, AdmissionRejectedError, ValueError) as e:
                self.metrics.plug_operations.labels(action=action, result="rejected").inc()
                logger.info("%s refused: %s", action, e)
                raise
            except Exception:
                self.metrics.plug_operations.labels(action=action, result="error").inc()
                logger.exception("%s failed", action)
                raise
            self._plugged(plugged)
            self.metrics.plug_operations.labels(action=action, result="ok").inc()
            self.metrics.plug_duration.labels(action="plug").observe(time.perf_counter() - start)
            logger.info(
                "%s %s (rank %d, %d layers), expert-set version %d",
                "replaced" if replaced else "plugged",
                expert.name,
                expert.rank,
                len(expert.layers),
                self.manifest.version,
            )
            return plugged, report, replaced

    async def plug_source(self, source: str, name: str | None, replace: bool) -> tuple[Expert, dict | None, bool]:
        data = await asyncio.to_thread(fetch_source, source)
        return await self.plug_bytes(data, name, replace)

    async def unplug(self, name: str, purge: bool) -> bool:
        """Commit the set without it, then swap it out. purge: also delete its file. Returns whether a file
        was deleted."""
        start = time.perf_counter()
        async with self._lock:
            try:
                self.model.plugged.index(name)  # raises UnknownExpertError
                entry = self.manifest.get(name)
                self.manifest = await asyncio.to_thread(self.store.commit, self.manifest, self.manifest.without(name))
                await self.engine.unplug(name)
            except UnknownExpertError:
                self.metrics.plug_operations.labels(action="unplug", result="rejected").inc()
                raise
            except Exception:
                self.metrics.plug_operations.labels(action="unplug", result="error").inc()
                raise
            self.plugged_at.pop(name, None)
            self.metrics.expert_unplugged(name, self.model.num_layers, len(self.model.plugged))
            purged = False
            if purge and entry is not None and all(e.sha256 != entry.sha256 for e in self.manifest.experts):
                purged = await asyncio.to_thread(self.store.delete_blob, entry.sha256)
            self.metrics.plug_operations.labels(action="unplug", result="ok").inc()
            self.metrics.plug_duration.labels(action="unplug").observe(time.perf_counter() - start)
            logger.info(
                "unplugged %s%s, expert-set version %d",
                name,
                " and deleted its file" if purged else "",
                self.manifest.version,
            )
            return purged

    def _plugged(self, expert: Expert) -> None:
        self.plugged_at[expert.name] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.metrics.expert_plugged(expert.name, self.model.num_layers, len(self.model.plugged))

    # --- reading ------------------------------------------------------------------------------------------

    def describe(self, name: str) -> dict[str, Any]:
        expert = self.model.plugged.get(name)  # raises UnknownExpertError
        meta = expert.metadata
        return {
            "name": expert.name,
            "description": expert.description,
            "examples": list(expert.examples),
            "kind": meta.get("kind", "bottleneck"),
            "rank": expert.rank,
            "layers": list(expert.layers),
            "size_bytes": int(meta.get("size_bytes") or expert.nbytes),
            "plugged_at": self.plugged_at.get(name),
            "tokens_routed": self.engine.tokens_routed(name),
            "provenance": meta.get("provenance") or {},
            "evals": meta.get("evals") or {},
            "created": meta.get("created") or None,
        }

    def describe_all(self) -> list[dict[str, Any]]:
        return [self.describe(name) for name in self.model.plugged.names]
