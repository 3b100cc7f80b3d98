"""The served expert set: plugging from files and sources, admission, the experts directory, metrics.

A plug validates the file (experts.ExpertFile.load) off the engine thread, then runs the admission report
and the swap on the engine thread between two steps (the report runs the model, which only the engine
may do), then writes the file into the experts directory atomically so the set survives a restart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx

from experts import ExpertFile, ExpertFileError, write_atomically
from moe import Expert, ExpertNameTakenError, RoutedModel, UnknownExpertError
from server.engine import Engine
from server.errors import AdmissionRejectedError, ExpertSourceError
from server.metrics import Metrics
from server.settings import Settings

logger = logging.getLogger(__name__)

MAX_DOWNLOAD_BYTES = 1 << 30
SUFFIX = ".safetensors"


class ExpertRegistry:
    def __init__(self, engine: Engine, tokenizer: Any, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.model: RoutedModel = engine.model
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics
        self.directory = settings.resolved_experts_dir()
        self.plugged_at: dict[str, str] = {}
        self.files: dict[str, Path] = {}
        self._calibration: list[str] | None = None
        self._lock = asyncio.Lock()  # one plug or unplug at a time, so file writes follow swaps in order

    # --- startup --------------------------------------------------------------------------------------

    def plug_directory(self) -> list[str]:
        """Plug every expert file in the experts directory (before the engine starts). A bad file is logged
        and skipped, so one broken file cannot keep the server down. No admission: these were admitted
        when they were uploaded, or put there by the operator."""
        if not self.directory.is_dir():
            logger.info("experts directory %s does not exist yet; starting with no experts", self.directory)
            return []
        names = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                expert = ExpertFile.load(path, backbone=self.model.fingerprint)
                self.model.plug(expert)
            except (ExpertFileError, ExpertNameTakenError, ValueError) as e:
                logger.error("not plugging %s: %s", path, e)
                continue
            self._plugged(expert, path)
            names.append(expert.name)
        logger.info("plugged %d experts from %s: %s", len(names), self.directory, names)
        return names

    # --- plug / unplug --------------------------------------------------------------------------------

    async def plug_bytes(self, data: bytes, name: str | None, replace: bool) -> tuple[Expert, dict | None, bool]:
        """Validate, admit, plug and persist. Returns (expert, admission report or None, replaced)."""
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
                report = await self.engine.run(lambda: self._admit_and_plug(expert, replace))
                path = self.directory / f"{expert.name}{SUFFIX}"
                old_path = self.files.get(expert.name)
                payload = data if name is None or name == _file_name(data) else None
                if payload is None:
                    payload = ExpertFile.to_bytes(expert, self.model.fingerprint)
                await asyncio.to_thread(write_atomically, path, payload)
                if old_path is not None and old_path != path:
                    old_path.unlink(missing_ok=True)
            except (ExpertFileError, ExpertNameTakenError, AdmissionRejectedError, ValueError) as e:
                self.metrics.plug_operations.labels(action=action, result="rejected").inc()
                logger.info("%s refused: %s", action, e)
                raise
            except Exception:
                self.metrics.plug_operations.labels(action=action, result="error").inc()
                logger.exception("%s failed", action)
                raise
            self._plugged(self.model.plugged.get(expert.name), path)
            self.metrics.plug_operations.labels(action=action, result="ok").inc()
            self.metrics.plug_duration.labels(action="plug").observe(time.perf_counter() - start)
            logger.info(
                "%s %s (rank %d, %d layers)",
                "replaced" if replaced else "plugged",
                expert.name,
                expert.rank,
                len(expert.layers),
            )
            return self.model.plugged.get(expert.name), report, replaced

    async def plug_source(self, source: str, name: str | None, replace: bool) -> tuple[Expert, dict | None, bool]:
        data = await asyncio.to_thread(fetch_source, source)
        return await self.plug_bytes(data, name, replace)

    async def unplug(self, name: str, purge: bool) -> bool:
        """Unplug (applies from the next step). purge: also delete the file. Returns whether a file was deleted."""
        start = time.perf_counter()
        async with self._lock:
            try:
                await self.engine.run(lambda: self._unplug_now(name))
            except UnknownExpertError:
                self.metrics.plug_operations.labels(action="unplug", result="rejected").inc()
                raise
            except Exception:
                self.metrics.plug_operations.labels(action="unplug", result="error").inc()
                raise
            path = self.files.pop(name, None)
            self.plugged_at.pop(name, None)
            purged = False
            if purge and path is not None and path.exists():
                await asyncio.to_thread(path.unlink)
                purged = True
            self.metrics.plug_operations.labels(action="unplug", result="ok").inc()
            self.metrics.plug_duration.labels(action="unplug").observe(time.perf_counter() - start)
            logger.info("unplugged %s%s", name, " and deleted its file" if purged else "")
            return purged

    def _admit_and_plug(self, expert: Expert, replace: bool) -> dict | None:
        """On the engine thread: the admission report, the limits, then the swap."""
        report = self._admission(expert)
        self.model.plug(expert, replace=replace)
        if replace and expert.name in self.engine.routed_totals:
            self.engine.routed_totals[expert.name] = 0.0
        return report

    def _unplug_now(self, name: str) -> None:
        expert = self.model.unplug(name)
        self.engine.routed_totals.pop(name, None)
        self.metrics.expert_unplugged(name, self.model.num_layers, len(self.model.plugged))
        del expert

    def _admission(self, expert: Expert) -> dict | None:
        max_fpr = Settings.limit(self.settings.max_false_positive_rate)
        max_steal = Settings.limit(self.settings.max_steal_rate)
        if max_fpr is None and max_steal is None:
            return None
        # imported here so tests can substitute the report's maths (tests/server/test_admission.py)
        from experts.admission import admission_report, load_calibration_texts

        if self._calibration is None:
            self._calibration = load_calibration_texts(self.settings.calibration_file)
        report = admission_report(self.model, self.tokenizer, expert, self._calibration)
        problems = []
        if max_fpr is not None and report.false_positive_rate > max_fpr:
            problems.append(
                f"false-positive rate {report.false_positive_rate:.3f} on general text is over the limit {max_fpr}"
            )
        if max_steal is not None:
            problems += [
                f"it takes {rate:.3f} of expert {other!r}'s tokens, over the limit {max_steal}"
                for other, rate in sorted(report.steal_rates.items())
                if rate > max_steal
            ]
        if problems:
            raise AdmissionRejectedError(
                f"expert {expert.name!r} was not plugged: {'; '.join(problems)}. Retrain its gate (raise its "
                "thresholds) or raise the limits (--max-false-positive-rate, --max-steal-rate)"
            )
        return report.to_dict()

    def _plugged(self, expert: Expert, path: Path) -> None:
        self.plugged_at[expert.name] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.files[expert.name] = path
        self.metrics.expert_plugged(expert.name, self.model.num_layers, len(self.model.plugged))

    # --- reading --------------------------------------------------------------------------------------

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
            "tokens_routed": self.engine.routed_totals.get(name, 0.0),
            "provenance": meta.get("provenance") or {},
            "evals": meta.get("evals") or {},
            "created": meta.get("created") or None,
        }

    def describe_all(self) -> list[dict[str, Any]]:
        return [self.describe(name) for name in self.model.plugged.names]


def _file_name(data: bytes) -> str | None:
    try:
        return ExpertFile.read_header(data)[0].get("name")
    except ExpertFileError:
        return None


def fetch_source(source: str) -> bytes:
    """The bytes of an expert file at a local path, a file:// URL or an http(s):// URL."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        try:
            with httpx.stream("GET", source, timeout=30.0, follow_redirects=True) as response:
                response.raise_for_status()
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_DOWNLOAD_BYTES:
                        raise ExpertSourceError(f"{source} is larger than {MAX_DOWNLOAD_BYTES} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPStatusError as e:
            raise ExpertSourceError(f"fetching {source} failed: HTTP {e.response.status_code}") from e
        except httpx.HTTPError as e:
            raise ExpertSourceError(f"fetching {source} failed: {type(e).__name__}: {e}") from e
    if parsed.scheme == "file":
        path = Path(urllib.parse.unquote(parsed.path))
    elif parsed.scheme in ("",) or (len(parsed.scheme) == 1 and source[1:3] in (":\\", ":/")):
        path = Path(source)
    else:
        raise ExpertSourceError(
            f"source {source!r} has scheme {parsed.scheme!r}; use a local path, file:// or http(s)://"
        )
    try:
        return path.read_bytes()
    except OSError as e:
        raise ExpertSourceError(f"cannot read expert file {str(path)!r}: {e.strerror or e}") from e
