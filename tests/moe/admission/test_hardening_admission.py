"""Finding 7 of the hardening review, at the admission probe: weights within the file format's bounds can
still combine into an overflow in the serving dtype; the pinned probe sees it before anything is plugged."""

from __future__ import annotations

import torch

from moe import Expert, RoutedModel
from moe.adapters.file import MAX_ABS_WEIGHT
from moe.admission.report import probe_is_finite
from tests.tiny import tiny_backbone, tiny_expert, tiny_tokenizer


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
    """The admission policy keeps each plugged set's baseline passes between plugs (finding 3: a plug's cost;
    they replaced the kept calibration inputs when admission moved to token-mode quality); the report must
    not change for it."""
    from moe.admission.report import AdmissionLimits, BaselineCache, admit

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
    measure_only = AdmissionLimits(None, None, None, None, mode="refuse")
    cache = BaselineCache()
    cold = admit(model, tokenizer, candidate, texts, measure_only, cache).report.to_dict()
    weights = [model.plugged.read(name) for name in model.plugged.names]  # a live set's experts are weightless
    assert cache.get(cache.key(weights, texts, 128)), "the baseline was kept"
    warm = admit(model, tokenizer, candidate, texts, measure_only, cache).report.to_dict()
    fresh = admit(model, tokenizer, candidate, texts, measure_only, BaselineCache()).report.to_dict()
    cold.pop("seconds"), warm.pop("seconds"), fresh.pop("seconds")
    assert warm == cold == fresh
