"""The admission policy: run moe's admission (report, and repair where allowed) on a candidate before it is
plugged, with the limits from the settings; refuse it when it cannot meet them."""

from __future__ import annotations

import logging
from typing import Any

from moe import Expert, RoutedModel
from moe.admission.report import LIMIT_NAMES, AdmissionLimits, BaselineCache, admit, load_calibration_texts
from moe.admission.router_fit import ContextRouterFitter
from server.errors import AdmissionRejectedError
from server.settings import Settings

logger = logging.getLogger(__name__)


class AdmissionPolicy:
    def __init__(self, settings: Settings) -> None:
        mode = "refuse" if settings.admission == "off" else settings.admission  # off: never run, see enabled
        self.limits = AdmissionLimits.from_flags(mode, **{name: getattr(settings, name) for name in LIMIT_NAMES})
        self.enabled = settings.admission != "off" and self.limits.checks_anything
        self.calibration_file = settings.calibration_file
        self._calibration: list[str] | None = None
        self._baselines = BaselineCache()  # the plugged set's own passes, reused by the next plug

    def review(
        self, model: RoutedModel, tokenizer: Any, expert: Expert, router_fitter: ContextRouterFitter | None = None
    ) -> tuple[Expert, dict | None]:
        """(the expert to plug, the report as a dict; None when admission is off). The expert is the candidate
        itself, or in repair mode a copy with raised thresholds. Raises AdmissionRejectedError when it cannot
        meet the limits. Runs the model (forwards on the current plugged set); it touches no plugged state.
        router_fitter: the context router serves (--router context): the limits are measured under the set's
        router without and with the candidate, a repair raises the candidate's floors in the refit router (the
        fitter keeps that router: the plug serves with it; the expert keeps its thresholds), and the report also
        gives the candidate's recall and sequence-mode oracle gap under it.
        """
        if not self.enabled:
            return expert, None
        if self._calibration is None:
            self._calibration = load_calibration_texts(self.calibration_file)
        admission = admit(
            model, tokenizer, expert, self._calibration, self.limits, self._baselines, router_fitter=router_fitter
        )
        report = admission.report.to_dict()
        if not admission.admitted:
            repair = admission.report.repair
            if repair is not None and repair.raised == "floors":  # the context router routes: its floors were raised
                hint = (
                    "Even with its floors in the context router raised it breaks them: give it a domain sample "
                    "(`plugmoe add-sample`) that tells its domain apart from the plugged experts'"
                )
            elif self.limits.mode == "repair":
                hint = "Retrain its gate beside the plugged experts (`plugmoe train-expert --with-experts`)"
            else:
                hint = "Plug it with --admission repair, retrain its gate beside the plugged experts"
            raise AdmissionRejectedError(
                f"expert {expert.name!r} was not plugged: {'; '.join(admission.report.problems)}. {hint}, or "
                "raise the limits (--max-false-positive-rate, --max-steal-rate, --max-base-ppl-increase, "
                "--max-domain-ppl-increase)",
                report=report,
            )
        return admission.expert, report
