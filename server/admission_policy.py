"""The admission policy: run moe's admission report on a candidate and refuse it over the configured limits."""

from __future__ import annotations

import logging
from typing import Any

from moe import Expert, RoutedModel
from moe.admission import admission_report, load_calibration_texts
from server.errors import AdmissionRejectedError
from server.settings import Settings

logger = logging.getLogger(__name__)


class AdmissionPolicy:
    def __init__(self, settings: Settings) -> None:
        self.max_false_positive_rate = Settings.limit(settings.max_false_positive_rate)
        self.max_steal_rate = Settings.limit(settings.max_steal_rate)
        self.calibration_file = settings.calibration_file
        self._calibration: list[str] | None = None

    @property
    def enabled(self) -> bool:
        return self.max_false_positive_rate is not None or self.max_steal_rate is not None

    def review(self, model: RoutedModel, tokenizer: Any, expert: Expert) -> dict | None:
        """The report as a dict (None when admission is off). Raises AdmissionRejectedError over a limit.

        Runs the model (observe-only forwards on the current plugged set); it touches no plugged state.
        """
        if not self.enabled:
            return None
        if self._calibration is None:
            self._calibration = load_calibration_texts(self.calibration_file)
        report = admission_report(model, tokenizer, expert, self._calibration)
        problems = []
        max_fpr, max_steal = self.max_false_positive_rate, self.max_steal_rate
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
