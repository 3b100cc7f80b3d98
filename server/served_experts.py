"""The served expert set: plug and unplug through the store, the admission policy and the engine.

    plug:   validate the file (moe.file) -> a pinned probe forward whose logits must be finite -> admission
            (server.admission_policy; in repair mode it may raise the candidate's thresholds, and the repaired
            file is what is stored) -> store the file and commit the next expert-set version
            (server.expert_store) -> swap it in (Engine.plug, between two steps)
    unplug: commit the version without it -> swap it out (Engine.unplug)
    start:  plug the store's current version (seeded from --seed-experts on first start)

Disk first, then memory: a plug that cannot be stored (a full disk: 507) is refused before anything is
swapped, and an unplug that cannot be committed leaves the expert plugged, so the client's answer, the model
and the store always agree. One plug or unplug runs at a time. Validation, admission and the probe run on
worker threads of their own (the report at a lower priority), never on the engine thread, which only swaps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from moe import Expert, ExpertFile, ExpertFileError, ExpertNameTakenError, UnknownExpertError
from moe.admission import probe_is_finite
from moe.errors import NonFiniteOutputError
from server.admission_policy import AdmissionPolicy
from server.engine import Engine
from server.errors import AdmissionRejectedError, RequestTooLargeError
from server.expert_sources import ExpertSources
from server.expert_store import ExpertStore, Manifest, ManifestEntry, StoreCorruptError
from server.metrics import Metrics

T = TypeVar("T")
ADMISSION_NICENESS = 10  # under full load, the admission report gets ~10% of a core beside decoding (CFS weights)

logger = logging.getLogger(__name__)


class ServedExperts:
    def __init__(
        self,
        engine: Engine,
        store: ExpertStore,
        policy: AdmissionPolicy,
        metrics: Metrics,
        sources: ExpertSources | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.policy = policy
        self.metrics = metrics
        self.sources = sources
        self.manifest = Manifest(0)
        self.plugged_at: dict[str, str] = {}
        self._lock = asyncio.Lock()
        # validation and the probe (quick) on one worker; the admission report (many forwards) on another,
        # at a lower scheduling priority, so decoding keeps the CPU it needs while a report runs
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="plugmoe-plug")
        self._admission = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="plugmoe-admission", initializer=_yield_to_decoding
        )

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._admission.shutdown(wait=False, cancel_futures=True)

    async def _off_engine(
        self, fn: Callable[..., T], *args: Any, worker: concurrent.futures.Executor | None = None
    ) -> T:
        """Run fn on a plug worker thread (validation, the probe; `worker`: the admission one), never on the
        engine thread."""
        return await asyncio.wrap_future((worker or self._worker).submit(fn, *args))

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
        """Version 1 of the store: every valid expert file in seed_dir, in file-name order.

        A file that cannot be plugged is skipped with a log line. A name claimed by several files is seeded
        from the one named after it (`<name>.safetensors`); when none is, from none of them: which one would
        win must never depend on the order of file names."""
        candidates: dict[str, list[tuple[Path, bytes]]] = defaultdict(list)
        for path in sorted(Path(seed_dir).glob("*.safetensors")):
            try:
                data = path.read_bytes()
                expert = ExpertFile.load(data, self.model.fingerprint)
            except (OSError, ExpertFileError, ValueError) as e:
                logger.error("not seeding %s: %s", path, e)
                continue
            candidates[expert.name].append((path, data))
        entries: list[ManifestEntry] = []
        for name, files in candidates.items():
            chosen = [(path, data) for path, data in files if path.stem == name] if len(files) > 1 else files
            if len(chosen) != 1:
                logger.error(
                    "not seeding expert %r: files %s all claim that name and none is named %s.safetensors; "
                    "rename or remove all but one",
                    name,
                    [str(path) for path, _ in files],
                    name,
                )
                continue
            path, data = chosen[0]
            for other, _ in files:
                if other != path:
                    logger.error("not seeding %s: its expert is named %r, which %s is named after", other, name, path)
            if path.stem != name:
                logger.warning("seeding %s as %r, the name inside the file", path, name)
            stored = self.store.put_blob(data)
            entries.append(ManifestEntry(name, stored.sha256, stored.size))
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
                expert = await self._off_engine(ExpertFile.load, data, self.model.fingerprint, name)
                replaced = expert.name in self.model.plugged
                if replaced and not replace:  # fail before the admission report: it is the expensive part
                    raise ExpertNameTakenError(
                        f"an expert named {expert.name!r} is already plugged; unplug it first, pass replace, "
                        "or choose another name"
                    )
                action = "replace" if replaced else "plug"
                if not await self._off_engine(probe_is_finite, self.model, self.engine.tokenizer, expert):
                    raise NonFiniteOutputError(
                        f"expert {expert.name!r}, pinned, makes the model's logits NaN or infinite on a short "
                        "probe text; its weights are within bounds but do not work together. Retrain it"
                    )
                expert, report = await self._off_engine(
                    self.policy.review, self.model, self.engine.tokenizer, expert, worker=self._admission
                )
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
            except (
                ExpertFileError,
                ExpertNameTakenError,
                AdmissionRejectedError,
                RequestTooLargeError,
                ValueError,
            ) as e:
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
        if self.sources is None:
            raise RuntimeError("this server was built without expert sources")
        data = await self.sources.fetch(source)
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


def _yield_to_decoding() -> None:
    """The admission worker's setup: its forwards compete with decoding for the CPU, so it runs at a lower
    scheduling priority (Linux: niceness is per thread, and the torch worker threads it starts inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ADMISSION_NICENESS)
    except (AttributeError, OSError) as e:
        logger.debug("could not lower the admission worker's priority: %s", e)
