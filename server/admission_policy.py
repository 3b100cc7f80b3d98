"""The admission policy: run moe's admission report on a candidate and refuse it over the configured limits."""

from __future__ import annotations

import logging
from typing import Any

from moe import Expert, RoutedModel
from moe.admission import admission_report, calibration_inputs, load_calibration_texts
from server.errors import AdmissionRejectedError
from server.settings import Settings

logger = logging.getLogger(__name__)

# The calibration text's MLP inputs are kept between reviews when they take at most this much memory (the
# demo model: ~60 MB); a larger model recomputes them for each review.
MAX_KEPT_CALIBRATION_BYTES = 256 << 20


class AdmissionPolicy:
    def __init__(self, settings: Settings) -> None:
        self.max_false_positive_rate = Settings.limit(settings.max_false_positive_rate)
        self.max_steal_rate = Settings.limit(settings.max_steal_rate)
        self.calibration_file = settings.calibration_file
        self._calibration: list[str] | None = None
        self._inputs: list | None = None  # calibration_inputs, kept when small enough
        self._inputs_too_large = False

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
        inputs = self._inputs
        if inputs is None:
            inputs = calibration_inputs(model, tokenizer, self._calibration)
            size = sum(x.numel() * x.element_size() for x in inputs)
            if not self._inputs_too_large and size <= MAX_KEPT_CALIBRATION_BYTES:
                self._inputs = inputs
                logger.info("keeping the calibration text's MLP inputs for later reviews (%.1f MB)", size / 1e6)
            else:
                self._inputs_too_large = True
        report = admission_report(model, tokenizer, expert, self._calibration, calibration=inputs)
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
