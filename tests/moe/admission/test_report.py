"""The admission report on a tiny model: false positives on base text, steal rates against plugged experts, the
baseline cache, and the probe that catches an overflow before anything is plugged."""

from __future__ import annotations

import torch

from moe import Expert, RoutedModel
from moe.adapters.file import MAX_ABS_WEIGHT
from moe.admission.report import (
    AdmissionLimits,
    AdmissionReport,
    BaselineCache,
    admit,
    load_calibration_texts,
    probe_is_finite,
)
from tests.tiny import tiny_backbone, tiny_expert, tiny_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "In the morning the weather was cold."]
MEASURE_ONLY = AdmissionLimits(None, None, None, None, mode="refuse")  # the measurements alone: no limit, no repair


def admission_report(model: RoutedModel, tokenizer, expert: Expert, calibration: list[str]) -> AdmissionReport:
    """What plugging `expert` as it is would do."""
    return admit(model, tokenizer, expert, calibration, MEASURE_ONLY).report


def gate(name: str, seed: int, threshold: float) -> Expert:
    """Only a gate matters here: the adapter stays zero (up_scale=0)."""
    examples = ("def add(a, b):\n    return a + b\n", "Mia walks to the market.")
    return tiny_expert(name, seed=seed, up_scale=0, threshold=threshold, examples=examples)


def setup() -> tuple[RoutedModel, object]:
    tok = tiny_tokenizer()
    return RoutedModel(tiny_backbone("llama", vocab=len(tok))), tok


def test_closed_gate_has_no_false_positives_and_open_gate_has_all() -> None:
    model, tok = setup()
    closed = admission_report(model, tok, gate("closed", 1, threshold=2.0), TEXTS)
    assert closed.false_positive_rate == 0.0 and closed.base_decisions > 0
    opened = admission_report(model, tok, gate("open", 1, threshold=-2.0), TEXTS)
    assert opened.false_positive_rate == 1.0
    assert model.plugged.names == (), "the report plugs nothing"


def test_steal_rate_against_a_plugged_expert() -> None:
    model, tok = setup()
    model.plug(gate("owner", 1, threshold=-2.0))  # wins every token of its examples
    same_key = gate("thief", 1, threshold=-2.0)
    same_key.offsets = torch.full_like(same_key.offsets, 0.5)  # same key, higher score: takes everything
    assert admission_report(model, tok, same_key, TEXTS).steal_rates == {"owner": 1.0}
    shy = gate("shy", 2, threshold=2.0)
    assert admission_report(model, tok, shy, TEXTS).steal_rates == {"owner": 0.0}
    partial = admission_report(model, tok, gate("other", 3, threshold=-2.0), TEXTS).steal_rates["owner"]
    assert 0.0 < partial < 1.0, "an independent random key wins some tokens, not all"
    assert model.plugged.names == ("owner",)


def test_shipped_calibration_text_loads() -> None:
    texts = load_calibration_texts()
    assert len(texts) >= 100 and all(texts)


# --- the probe (weights within the file format's bounds can still combine into an overflow in the serving
# dtype: the pinned probe sees it before anything is plugged) and the baseline cache


def _expert(scale: float) -> Expert:
    expert = tiny_expert("probe")
    expert.down = torch.full_like(expert.down, scale)
    expert.up = torch.full_like(expert.up, scale)
    return expert


def test_the_probe_refuses_an_expert_that_overflows_in_float16_and_passes_a_sane_one() -> None:
    model = RoutedModel(tiny_backbone("llama").to(torch.float16))
    tokenizer = tiny_tokenizer()
    before = model.plugged
    huge = _expert(MAX_ABS_WEIGHT)  # every weight at the bound: finite in float16, the sum of them is not
    assert torch.isfinite(huge.to("cpu", torch.float16).up).all()
    assert probe_is_finite(model, tokenizer, huge) is False
    assert probe_is_finite(model, tokenizer, _expert(0.01)) is True
    assert model.plugged is before, "the probe plugs nothing"


def test_a_report_on_a_cached_baseline_equals_one_computed_afresh() -> None:
    """The admission policy keeps each plugged set's baseline passes between plugs (a plug's cost); the report
    must not change for it."""
    model = RoutedModel(tiny_backbone("llama"))
    tokenizer = tiny_tokenizer()
    plugged = _expert(0.1)
    plugged.name, plugged.examples = "plugged", ("The quick brown fox", "Question: 3 + 4")
    plugged.thresholds = torch.full_like(plugged.thresholds, -2.0)
    model.plug(plugged)
    candidate = _expert(0.2)
    candidate.keys = -candidate.keys
    candidate.thresholds = torch.full_like(candidate.thresholds, 0.0)
    texts = ["In the morning the weather was cold.", "def add(a, b): return a + b", "Mia buys 12 eggs."]
    cache = BaselineCache()
    cold = admit(model, tokenizer, candidate, texts, MEASURE_ONLY, cache).report.to_dict()
    weights = [model.plugged.read(name) for name in model.plugged.names]  # a live set's experts are weightless
    assert cache.get(cache.key(weights, texts, 128)), "the baseline was kept"
    warm = admit(model, tokenizer, candidate, texts, MEASURE_ONLY, cache).report.to_dict()
    fresh = admit(model, tokenizer, candidate, texts, MEASURE_ONLY, BaselineCache()).report.to_dict()
    cold.pop("seconds"), warm.pop("seconds"), fresh.pop("seconds")
    assert warm == cold == fresh
