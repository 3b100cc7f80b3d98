"""The served expert set: plug and unplug through the store, the admission policy and the engine.

    plug:   validate the file (`_load`: moe.adapters.file, then its fit to the model) -> catch up with the store
            -> a pinned probe forward whose logits must be finite -> admission (server.admission_policy; in repair
            mode it may raise the candidate's thresholds, and the repaired file is what is stored; skipped for a
            pin-only expert, whose closed gate takes no decision it could measure) -> store the file and commit
            the next expert-set version (server.expert_store) -> serve it
    unplug: catch up with the store -> commit the version without it -> serve it
    start:  serve the store's current version (seeded from --seed-experts on first start)
    watch:  every poll interval, read the store and serve a newer version (committed by another server or
            replica)
    serve a version: its experts in manifest order (files read and checked against their hashes unless
            already plugged), swapped in whole with one Engine.set_experts, between two steps

Pin-only (gateless) experts: an expert whose gate is closed (moe.adapters.expert.Expert.closed_gate: on no
layer can a score pass its threshold) never wins a token in token or sequence mode; it serves when pinned
(`routing.mode=pin`, or its name as an OpenAI `model`). A PEFT LoRA loaded with POST /v1/load_lora_adapter
is one. `describe` says `routes: false` for it.

Disk first, then memory: a plug that cannot be stored (a full disk: 507) is refused before anything is
swapped, and an unplug that cannot be committed leaves the expert plugged, so the client's answer, the model
and the store always agree. One plug, unplug or reconcile runs at a time. Validation, admission and the probe
run on worker threads of their own (the report at a lower priority), never on the engine thread, which only
swaps. A plug first catches up with the store (so the name check and admission see what other writers
plugged), and when another writer commits the same version first it reads the store again: the same name is a
409, a different name is admitted against the new set and committed on top.

In a cluster (server.cluster) every replica runs this same code against one shared store; `replicas` then
tells a plug when every live replica serves the version it committed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from moe import Expert, ExpertFile, ExpertFileError, ExpertNameTakenError, UnknownExpertError
from moe.adapters.file import MAX_RANK, bound_domain_sample
from moe.adapters.peft import CONFIG_FILE, WEIGHTS_FILE, convert_peft, parse_adapter
from moe.admission.report import probe_is_finite
from moe.admission.router_fit import ContextRouterFitter
from moe.errors import NonFiniteOutputError
from server.admission_policy import AdmissionPolicy
from server.engine import Engine, in_passing_thread
from server.errors import AdmissionRejectedError, RequestTooLargeError
from server.expert_sources import ExpertSources
from server.expert_store import (
    ExpertStore,
    GarbageReport,
    Manifest,
    ManifestConflictError,
    ManifestEntry,
    StoreCorruptError,
    StoreUnavailableError,
)
from server.metrics import Metrics

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
ADMISSION_NICENESS = 10  # under full load, the admission report gets ~10% of a core beside decoding (CFS weights)

logger = logging.getLogger(__name__)

VERSION_HEADER = "X-Plugmoe-Expert-Set-Version"
COMMIT_ATTEMPTS = 5  # a plug that loses the race for the next version this many times in a row gets a 409


class PlugResult(NamedTuple):
    expert: Expert
    admission: dict | None
    replaced: bool
    version: int  # the expert-set version that plugged it


class UnplugResult(NamedTuple):
    purged: bool
    version: int
    unplugged: bool = True  # False: a purge of an expert unplugged earlier (nothing was committed)


class Convergence(NamedTuple):
    """Whether every live replica serves a version (a cluster's answer to a plug)."""

    version: int
    converged: bool
    replicas: list[dict[str, Any]]


class ReplicaSet(Protocol):
    """The live replicas of a cluster and the expert-set version each serves (server.cluster implements it)."""

    wait_s: float  # how long a plug waits for every replica before it answers 202

    async def versions(self) -> list[dict[str, Any]]:
        """One dict per live replica: at least {"replica": id, "version": int | None (not answering)}."""
        ...


class ServedExperts:
    def __init__(
        self,
        engine: Engine,
        store: ExpertStore,
        policy: AdmissionPolicy,
        metrics: Metrics,
        sources: ExpertSources | None = None,
        replicas: ReplicaSet | None = None,
        max_rank: int = MAX_RANK,
        context_router: bool = False,
    ) -> None:
        self.engine = engine
        self.context_router = context_router  # --router context: fit the set's context router after each plug
        self.max_rank = max_rank  # --max-expert-rank: the largest rank a file may declare
        self.store = store
        self.policy = policy
        self.metrics = metrics
        self.sources = sources
        self.replicas = replicas
        self.manifest = Manifest(0)  # the version served
        self.store_version = 0  # the newest version seen in the store
        self.behind_since: float | None = None  # monotonic time the store was first seen ahead of what is served
        self.store_error: str | None = None  # the last failed read of the store while watching it, until one works
        self.skipped: dict[str, str] = {}  # experts of the served version that could not be plugged, and why
        self.plugged_at: dict[str, str] = {}
        self._shas: dict[str, str] = {}  # plugged name -> the SHA-256 of its file
        self._routes: dict[str, bool] = {}  # plugged name -> whether its gate can take a token (False: pin-only)
        self._lock = asyncio.Lock()
        self._router_fitter: ContextRouterFitter | None = None  # made on the first set served
        # validation and the probe (quick), one job at a time; the admission report (many forwards) one at a
        # time too, at a lower scheduling priority, so decoding keeps the CPU it needs while a report runs
        self._plug_jobs = threading.Lock()
        self._admission_jobs = threading.Lock()

    def close(self) -> None:
        """Nothing to stop: every job runs in a thread of its own that ends with it."""

    async def _off_engine(self, fn: Callable[..., T], *args: Any, admission: bool = False) -> T:
        """Run fn off the event loop and never on the engine thread, in a thread that ends when fn returns
        (server.engine.in_passing_thread: a live thread that once ran torch's parallel ops keeps an OpenMP pool,
        and a second pool slows the engine's); plug jobs (validation, the probe) one at a time, admission jobs
        (`admission`) one at a time at a lower priority."""
        jobs = self._admission_jobs if admission else self._plug_jobs

        def job() -> T:
            with jobs:
                if admission:
                    _yield_to_decoding()
                return fn(*args)

        return await in_passing_thread(job, name="plugmoe-admission" if admission else "plugmoe-plug")

    @property
    def model(self):
        return self.engine.model

    def _fit_router(self, experts: tuple[Expert, ...]) -> None:
        """Fit the context router of the set of these experts and hand it to the model (moe.admission.router_fit:
        each expert's texts captured once, a refit per set); none fits a set whose experts lack domain texts,
        and sequence mode then decides from the gates' counts. With --router gates, nothing is fitted."""
        if not self.context_router:
            return
        router = self._fitter().fit(experts)
        if router is None:
            return
        # a router for the set being served is published at once, its gates written into the slot storage that
        # decode steps read: like a plug, between two steps on the engine thread (before the engine starts: here)
        publish = functools.partial(self.model.offer_router, router)
        if self.engine.alive:
            self.engine.call(publish).result()
        else:
            publish()

    def _fitter(self) -> ContextRouterFitter:
        if self._router_fitter is None:
            self._router_fitter = ContextRouterFitter(self.model, self.engine.tokenizer)
        return self._router_fitter

    # --- start --------------------------------------------------------------------------------------------

    def load(self, seed_dir: Path | None = None) -> list[str]:
        """Plug the store's current expert set (before the engine starts); on first start, seed it from
        `seed_dir`. A file that cannot be plugged is logged and skipped, so one bad file cannot keep the
        server down; a store that cannot be read raises (nothing would be served consistently)."""
        self.store.open()
        manifest = self.store.current()
        if manifest.version == 0 and seed_dir is not None:
            manifest = self._seed(seed_dir)
        experts, skipped = self._resolve(manifest, {})
        self._fit_router(experts)
        self.model.set_experts(experts)
        self._served(manifest, experts, skipped)
        names = [e.name for e in experts]
        logger.info("plugged %d experts from %s (version %d): %s", len(names), self.store.url, manifest.version, names)
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
                expert = ExpertFile.load(data, self.model.fingerprint, max_rank=self.max_rank)
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
        try:
            manifest = self.store.commit(Manifest(0), tuple(entries))
        except ManifestConflictError:  # another server or replica seeded the shared store first
            return self.store.current()
        logger.info("seeded the expert store with %s from %s", list(manifest.names), seed_dir)
        return manifest

    # --- following the store ------------------------------------------------------------------------------

    async def watch(self, interval_s: float) -> None:
        """Reconcile with the store every `interval_s` until cancelled. A failed read is logged and counted
        (plugmoe_expert_store_errors_total); the version served stays until a read works again."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reconcile()
            except (StoreUnavailableError, StoreCorruptError) as e:
                self.metrics.expert_store_errors.inc()
                if str(e) != self.store_error:
                    logger.error("cannot follow the expert store (still serving version %d): %s", self.version, e)
                self.store_error = str(e)
            except Exception as e:  # the watch must outlive any one failure, or replicas silently diverge
                self.metrics.expert_store_errors.inc()
                self.store_error = f"{type(e).__name__}: {e}"
                logger.exception("reconciling with the expert store failed (still serving version %d)", self.version)
            else:
                if self.store_error is not None:
                    logger.info("the expert store is readable again")
                self.store_error = None

    async def reconcile(self) -> Manifest:
        """Apply the store's newest version if it is newer than the one served; returns the one served."""
        async with self._lock:
            return await self._catch_up()

    @property
    def version(self) -> int:
        return self.manifest.version

    def behind_s(self) -> float:
        """How long the store has held a newer version than the one served (0 when current)."""
        return 0.0 if self.behind_since is None else time.monotonic() - self.behind_since

    async def _catch_up(self) -> Manifest:
        """(lock held) Read the store; apply a newer version."""
        newer = await asyncio.to_thread(self.store.newer_than, self.manifest.version)
        if newer is not None:
            self._saw(newer.version)
            await self._apply(newer, {})
        return self.manifest

    async def _apply(self, target: Manifest, loaded: dict[str, Expert]) -> None:
        """(lock held) Serve `target`: its experts in its order, in one swap between two steps."""
        experts, skipped = await asyncio.to_thread(self._resolve, target, loaded)
        # the integration step: the set's context router, fitted before the swap (published with the set)
        await self._off_engine(self._fit_router, experts, admission=True)
        await self.engine.set_experts(experts)
        self._served(target, experts, skipped)
        logger.info("serving expert-set version %d: %s", target.version, [e.name for e in experts])

    def _resolve(self, target: Manifest, loaded: dict[str, Expert]) -> tuple[tuple[Expert, ...], dict[str, str]]:
        """The experts of `target` in order: kept when plugged with the same file, taken from `loaded`, or
        read from the store (hash checked) and validated. A file that is missing, corrupt or does not fit
        this backbone is skipped and logged (every replica skips it alike); StoreUnavailableError raises."""
        plugged = self.model.plugged
        experts: list[Expert] = []
        skipped: dict[str, str] = {}
        for entry in target.experts:
            if entry.name in loaded:
                experts.append(loaded[entry.name])
                continue
            if self._shas.get(entry.name) == entry.sha256 and entry.name in plugged:
                experts.append(plugged.get(entry.name))
                continue
            try:
                expert = self._load(self.store.read_blob(entry.sha256), entry.name)
            except (ExpertFileError, StoreCorruptError, ValueError) as e:
                logger.error("not plugging %r of expert-set version %d: %s", entry.name, target.version, e)
                skipped[entry.name] = str(e)
                continue
            experts.append(expert)
        return tuple(experts), skipped

    def _load(self, data: bytes, name: str | None) -> Expert:
        """An expert file read and checked against the served model: its format and backbone fingerprint
        (ExpertFile.load), then its fit (hidden size, layers, a LoRA's projections: e.g. a LoRA for another MLP
        width). The one validation a file gets in the server, for a plug and for a file read from the store."""
        expert = ExpertFile.load(data, self.model.fingerprint, name, max_rank=self.max_rank)
        self.model.plugged.check_fits(expert)
        return expert

    def _served(self, manifest: Manifest, experts: tuple[Expert, ...], skipped: dict[str, str]) -> None:
        """Bookkeeping once `experts` (the model's set now) serve `manifest`: metrics, hashes, times."""
        shas = {e.name: e.sha256 for e in manifest.experts}
        for name in list(self._shas):
            if name not in shas or name in skipped:
                self._shas.pop(name)
                self._routes.pop(name, None)
                self.plugged_at.pop(name, None)
                self.metrics.expert_unplugged(name, self.model.num_layers, len(experts))
        for expert in experts:
            if self._shas.get(expert.name) != shas[expert.name]:
                self._shas[expert.name] = shas[expert.name]
                self._routes[expert.name] = gate_routes(expert)  # a new file: a loaded expert, weights at hand
                self._plugged(expert)
        self.metrics.experts_plugged.set(len(experts))
        self.manifest, self.skipped = manifest, skipped
        self._saw(manifest.version)
        self.metrics.expert_set_version.set(manifest.version)

    def _saw(self, store_version: int) -> None:
        self.store_version = max(self.store_version, store_version)
        if self.store_version <= self.manifest.version:
            self.behind_since = None
        elif self.behind_since is None:
            self.behind_since = time.monotonic()

    async def wait_until_served(self, version: int, timeout_s: float | None = None) -> Convergence | None:
        """Cluster: wait until every live replica serves `version` or a newer one, at most `timeout_s`
        (default: the replica set's wait_s). None for one process: it serves what it committed."""
        if self.replicas is None:
            return None
        deadline = time.monotonic() + (self.replicas.wait_s if timeout_s is None else timeout_s)
        while True:
            replicas = await self.replicas.versions()
            converged = bool(replicas) and all((r.get("version") or 0) >= version for r in replicas)
            if converged or time.monotonic() >= deadline:
                return Convergence(version, converged, replicas)
            await asyncio.sleep(0.05)

    # --- plug / unplug ------------------------------------------------------------------------------------

    async def plug_bytes(self, data: bytes, name: str | None, replace: bool) -> PlugResult:
        """Validate, catch up with the store, admit, store, swap."""
        action = "replace" if replace else "plug"
        start = time.perf_counter()
        async with self._lock:
            try:
                expert = await self._off_engine(self._load, data, name)  # refused before anything is stored
                renamed = name is not None and name != ExpertFile.read_header(data)[0].get("name")
                candidate = expert
                for attempt in range(1, COMMIT_ATTEMPTS + 1):
                    before = await self._catch_up()  # what other writers plugged: the name check and admission see it
                    replaced = candidate.name in before.names
                    if replaced and not replace:  # fail before the admission report: it is the expensive part
                        raise ExpertNameTakenError(
                            f"an expert named {candidate.name!r} is already plugged; unplug it first, pass replace, "
                            "or choose another name"
                        )
                    action = "replace" if replaced else "plug"
                    if not await self._off_engine(probe_is_finite, self.model, self.engine.tokenizer, candidate):
                        raise NonFiniteOutputError(
                            f"expert {candidate.name!r}, pinned, makes the model's logits NaN or infinite on a short "
                            "probe text; its weights are within bounds but do not work together. Retrain it"
                        )
                    if gate_routes(candidate):
                        expert, report = await self._off_engine(
                            self.policy.review,
                            self.model,
                            self.engine.tokenizer,
                            candidate,
                            self._fitter() if self.context_router else None,
                            admission=True,
                        )
                    else:  # pin-only: its gate takes no decision, so the report could not change anything
                        expert, report = candidate, None
                        logger.info("%s is pin-only (its gate is closed): no admission report", candidate.name)
                    repaired = report is not None and report.get("repair") is not None
                    # the stored file is what is plugged: its name, and the thresholds a repair raised
                    stored_bytes = ExpertFile.to_bytes(expert, self.model.fingerprint) if repaired or renamed else data
                    expert.metadata["size_bytes"] = len(stored_bytes)  # what the store holds, not what was sent
                    stored = await asyncio.to_thread(self.store.put_blob, stored_bytes)
                    entry = ManifestEntry(expert.name, stored.sha256, stored.size)
                    try:
                        committed = await asyncio.to_thread(self.store.commit, before, before.with_expert(entry))
                        break
                    except ManifestConflictError:
                        if attempt == COMMIT_ATTEMPTS:
                            raise
                        logger.info("version %d was taken by another writer; rereading", before.version + 1)
                self._saw(committed.version)
                try:
                    await self._apply(committed, {expert.name: expert})
                except BaseException:  # disk said plugged, memory did not take it: put the old set back on disk
                    await self._revert(committed, before)
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
            plugged = self.model.plugged.get(expert.name)
            self.metrics.plug_operations.labels(action=action, result="ok").inc()
            self.metrics.plug_duration.labels(action="plug").observe(time.perf_counter() - start)
            logger.info(
                "%s %s (rank %d, %d layers), expert-set version %d",
                "replaced" if replaced else "plugged",
                expert.name,
                expert.rank,
                len(expert.layers),
                committed.version,
            )
            return PlugResult(plugged, report, replaced, committed.version)

    async def plug_source(self, source: str, name: str | None, replace: bool) -> PlugResult:
        if self.sources is None:
            raise RuntimeError("this server was built without expert sources")
        data = await self.sources.fetch(source)
        return await self.plug_bytes(data, name, replace)

    async def plug_peft(
        self,
        config: dict,
        tensors: dict[str, torch.Tensor],
        name: str,
        source: str,
        replace: bool,
        served_model: str | None = None,
    ) -> PlugResult:
        """A PEFT LoRA adapter (its config and tensors, read by the caller: fetch_peft, or a trusted path at
        start) converted to a pin-only LoRA expert (moe.adapters.peft: no training), then plugged as any file
        is. Its base model's name against `served_model` is a warning in its provenance, not a refusal (as in
        vLLM; shapes are always checked). Raises moe.adapters.peft.LoraImportError naming what does not fit."""
        expert, _ = await self._off_engine(
            functools.partial(convert_peft, served=served_model, ignore_base_model=True),
            config,
            tensors,
            self.model,
            name,
            source,
        )
        return await self.plug_bytes(ExpertFile.to_bytes(expert, self.model.fingerprint), None, replace)

    async def fetch_peft(self, directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """A PEFT adapter directory's two files, read through the source allow-lists (server.expert_sources:
        each file under --source-roots, or on --source-hosts), then parsed."""
        if self.sources is None:
            raise RuntimeError("this server was built without expert sources")
        base = directory.rstrip("/")
        config = await self.sources.fetch(f"{base}/{CONFIG_FILE}")
        weights = await self.sources.fetch(f"{base}/{WEIGHTS_FILE}")
        return await self._off_engine(parse_adapter, config, weights, directory)

    async def set_domain_sample(self, name: str, texts: list[str]) -> PlugResult:
        """The plugged expert's stored file with `texts` (bounded as the format bounds them) as its domain
        sample, plugged in its place through the plug path (admission measures its domain on it; a pin-only
        expert stays pin-only: no gate is trained here). What a context router fitted from domain samples
        will read to route to it."""
        entry = (await self.reconcile()).get(name)
        if entry is None:
            raise UnknownExpertError(f"no expert named {name!r} is plugged; plugged: {list(self.manifest.names)}")
        data = await asyncio.to_thread(self.store.read_blob, entry.sha256)
        expert = ExpertFile.load(data, self.model.fingerprint, max_rank=self.max_rank)
        expert.metadata["domain_sample"] = bound_domain_sample(texts)
        return await self.plug_bytes(ExpertFile.to_bytes(expert, self.model.fingerprint), None, replace=True)

    async def unplug(self, name: str, purge: bool) -> UnplugResult:
        """Commit the set without it, then swap it out. purge: also delete its file (when the new set does
        not use the same file under another name); of an expert unplugged earlier, purge deletes every file a
        manifest named it by that the current set does not use."""
        start = time.perf_counter()
        async with self._lock:
            try:
                for attempt in range(1, COMMIT_ATTEMPTS + 1):
                    before = await self._catch_up()
                    entry = before.get(name)
                    if entry is None and purge:
                        return await self._purge_unplugged(name, before)
                    if entry is None:
                        raise UnknownExpertError(
                            f"no expert named {name!r} is plugged; plugged: {list(before.names) or 'none'}"
                        )
                    try:
                        committed = await asyncio.to_thread(self.store.commit, before, before.without(name))
                        break
                    except ManifestConflictError:
                        if attempt == COMMIT_ATTEMPTS:
                            raise
                self._saw(committed.version)
                await self._apply(committed, {})
            except UnknownExpertError:
                self.metrics.plug_operations.labels(action="unplug", result="rejected").inc()
                raise
            except Exception:
                self.metrics.plug_operations.labels(action="unplug", result="error").inc()
                raise
            purged = False
            if purge and all(e.sha256 != entry.sha256 for e in committed.experts):
                purged = await asyncio.to_thread(self.store.delete_blob, entry.sha256)
                self.metrics.expert_store_deleted.labels(reason="purge").inc(int(purged))
            self.metrics.plug_operations.labels(action="unplug", result="ok").inc()
            self.metrics.plug_duration.labels(action="unplug").observe(time.perf_counter() - start)
            logger.info(
                "unplugged %s%s, expert-set version %d",
                name,
                " and deleted its file" if purged else "",
                committed.version,
            )
            return UnplugResult(purged, committed.version)

    async def _purge_unplugged(self, name: str, current: Manifest) -> UnplugResult:
        """(lock held) Delete the files of `name`, unplugged earlier, that the current set does not use."""
        named = await asyncio.to_thread(self.store.files_named, name)
        if not named:
            raise UnknownExpertError(
                f"no expert named {name!r} is plugged or was ever stored; plugged: {list(current.names) or 'none'}"
            )
        in_use = {e.sha256 for e in current.experts}
        deleted = [
            digest for digest in sorted(named - in_use) if await asyncio.to_thread(self.store.delete_blob, digest)
        ]
        self.metrics.expert_store_deleted.labels(reason="purge").inc(len(deleted))
        logger.info("purged %d stored files of %s (unplugged earlier)", len(deleted), name)
        return UnplugResult(bool(deleted), current.version, unplugged=False)

    async def collect_garbage(self, keep_versions: int, grace_s: float) -> GarbageReport:
        """Run the store's garbage collector (ExpertStore.collect_garbage), one change at a time with this
        server's own plugs and unplugs; the store's size metrics follow."""
        async with self._lock:
            report = await asyncio.to_thread(self.store.collect_garbage, keep_versions, grace_s)
        self.metrics.expert_store_deleted.labels(reason="gc").inc(len(report.deleted))
        self.metrics.store_files.set(report.files)
        self.metrics.store_bytes.set(report.bytes)
        return report

    def read_store_usage(self) -> None:
        """(a worker thread) Set the store's size metrics from two listings of the store."""
        usage = self.store.usage()
        served = {e.sha256: e.size for e in self.manifest.experts}
        self.metrics.store_files.set(usage.files)
        self.metrics.store_bytes.set(usage.bytes)
        self.metrics.store_served_bytes.set(sum(served.values()))
        self.metrics.store_manifests.set(usage.manifests)

    async def _revert(self, committed: Manifest, before: Manifest) -> None:
        """(lock held) Commit `before`'s experts on top of `committed`, which this server failed to apply."""
        try:
            reverted = await asyncio.to_thread(self.store.commit, committed, before.experts)
        except Exception:
            logger.exception(
                "could not take back expert-set version %d; the watch will apply the store's newest version",
                committed.version,
            )
            return
        if self.model.plugged.names == tuple(e.name for e in before.experts if e.name not in self.skipped):
            self.manifest = Manifest(reverted.version, before.experts, reverted.created)
            self._saw(reverted.version)
            self.metrics.expert_set_version.set(reverted.version)

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
            "kind": expert.kind,
            "rank": expert.rank,
            "layers": list(expert.layers),
            "size_bytes": int(meta.get("size_bytes") or expert.nbytes),
            "plugged_at": self.plugged_at.get(name),
            "tokens_routed": self.engine.tokens_routed(name),
            "routes": self._routes.get(name, True),
            "domain_sample_texts": len(meta.get("domain_sample") or ()),
            "provenance": meta.get("provenance") or {},
            "evals": meta.get("evals") or {},
            "created": meta.get("created") or None,
        }

    def describe_all(self) -> list[dict[str, Any]]:
        return [self.describe(name) for name in self.model.plugged.names]


def gate_routes(expert: Expert) -> bool:
    """Whether the expert's gate can take a token: on some layer a score (a cosine, at most 1, plus the offset)
    can pass its threshold. False for a closed gate (Expert.closed_gate, threshold 2): a pin-only expert."""
    return bool((expert.thresholds.float() < 1.0 + expert.offsets.float()).any())


def _yield_to_decoding() -> None:
    """The admission worker's setup: its forwards compete with decoding for the CPU, so it runs at a lower
    scheduling priority (Linux: niceness is per thread, and the torch worker threads it starts inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ADMISSION_NICENESS)
    except (AttributeError, OSError) as e:
        logger.debug("could not lower the admission worker's priority: %s", e)
