"""The admission report on a tiny model: false positives on base text, steal rates against plugged experts."""

from __future__ import annotations

import torch

from moe import Expert, RoutedModel
from moe.admission.report import admission_report, load_calibration_texts
from tests.tiny import tiny_backbone, tiny_expert, tiny_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "In the morning the weather was cold."]


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
