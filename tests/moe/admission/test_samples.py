"""Composition and admission on tiny models: winning scores against the router, passes against a real forward,
a well-behaved candidate passing untouched, a greedy one repaired (or refused in refuse mode, naming the domain
and the perplexity change), and the baseline cache."""

from __future__ import annotations

import pytest
import torch

from moe import RoutedModel, RoutingSpec
from moe.admission import report as admission_module
from moe.admission.report import AdmissionLimits, BaselineCache, admit
from moe.admission.samples import cap_threshold, sample_pass, winning_scores
from moe.model.backbone import FAMILIES
from moe.model.text_batches import batches, forward, texts
from moe.routing.router import choose_experts
from tests.tiny import tiny_backbone, tiny_expert, tiny_lora_expert, tiny_tokenizer

OWN = ["def add(a, b):\n    return a + b\n", "def sub(a, b):\n    return a - b\n"]
OWNER = ["Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer: 7", "1 + 2 = 3"]
CALIBRATION = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "In the morning the weather was cold, so the children stayed inside and read books.",
    "Mia walks to the market. She buys bread, milk and 12 eggs for her family.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def trained(tokenizer) -> RoutedModel:
    """A tiny Llama fitted to the texts above for a few steps, so that a wrong adapter costs perplexity (a random
    model predicts almost uniformly whatever its hidden states)."""
    backbone = tiny_backbone("llama", vocab=len(tokenizer))
    optimizer = torch.optim.Adam(backbone.parameters(), lr=1e-2)
    (batch,) = batches(tokenizer, texts([*CALIBRATION, *OWNER, *OWN]), 16, 64)
    for _ in range(80):
        loss = backbone(
            input_ids=batch.ids, attention_mask=batch.mask, labels=batch.ids.masked_fill(batch.mask == 0, -100)
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return RoutedModel(backbone.eval())


def owner():
    return tiny_expert("owner", seed=1, up_scale=0.0, threshold=2.0, metadata={"domain_sample": OWNER})


def candidate(threshold: float | None, up_scale: float = 0.3, name: str = "cand"):
    return tiny_expert(name, seed=2, up_scale=up_scale, threshold=threshold, metadata={"domain_sample": OWN})


# --- the maths ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
def test_winning_scores_say_where_the_candidate_wins_at_each_threshold(top_k: int) -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(200, 4, generator=generator) * 2 - 1  # [N, E], the candidate at slot 3
    thresholds = torch.tensor([0.2, -0.1, 0.5, 0.0])
    winning = winning_scores(scores, thresholds, 3, top_k)
    for t in (-1.0, -0.3, 0.0, 0.25, 0.6, 0.9):
        thresholds[3] = t
        choice = choose_experts(scores, thresholds, None, None, torch.ones(4, dtype=torch.bool), top_k)
        assert torch.equal((choice == 3).any(dim=1), winning > t), t


def test_cap_threshold_lets_the_allowed_count_through() -> None:
    winning = torch.tensor([0.9, 0.1, float("-inf"), 0.5, 0.3, float("-inf"), 0.7, 0.2, 0.4, 0.6])
    for share, passing in ((0.0, 0), (0.1, 1), (0.25, 2), (0.5, 5)):
        assert int((winning > cap_threshold(winning, share)).sum()) == passing
    assert cap_threshold(winning, 0.8) == float("-inf"), "8 allowed, 8 finite: nothing to block"


def test_a_pass_counts_what_the_router_decides(trained: RoutedModel, tokenizer) -> None:
    with_c = trained.plugged.plugging(owner().to("cpu", torch.float32)).plugging(candidate(0.0))
    result = sample_pass(trained, tokenizer, CALIBRATION, with_c, with_c, "cand")
    counts = [0.0, 0.0]
    for batch in batches(tokenizer, texts(CALIBRATION), 16, 128, eos=False):
        layer_counts = forward(trained, batch, [RoutingSpec()] * len(batch), with_c).trace.layer_counts()
        counts = [c + layer.get("cand", 0.0) for c, layer in zip(counts, layer_counts, strict=True)]
    assert result.taken == [int(c) for c in counts] and 0 < sum(result.taken) < 2 * result.decisions
    assert all(int((w > 0.0).sum()) == t for w, t in zip(result.winning, result.taken, strict=True))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_pass_scores_each_candidate_at_the_site_the_router_decides_it(family: str, tokenizer) -> None:
    """Experts that adapt attention are decided at the attention input, the rest at the MLP input among the
    tokens no early expert took: a pass counts, for each candidate, what the routed forward gives it."""
    model = RoutedModel(tiny_backbone(family, seed=0, vocab=len(tokenizer)))
    attention = list(FAMILIES[family].attention_targets)
    model.plug(tiny_lora_expert("all", model.target_shapes, seed=1, threshold=0.05, scale=0.3))
    model.plug(tiny_lora_expert("attn", model.target_shapes, seed=2, layers=(1,), targets=attention, threshold=0.0))
    model.plug(tiny_lora_expert("mlp", model.projection_shapes, seed=3, threshold=0.0, scale=0.3))
    model.plug(tiny_expert("neck", seed=4, threshold=0.1))
    plugged = model.plugged
    counts: list[dict[str, float]] = [{} for _ in range(2)]
    for batch in batches(tokenizer, texts(CALIBRATION), 16, 128, eos=False):
        for layer, layer_counts in enumerate(
            forward(model, batch, [RoutingSpec()] * len(batch), plugged).trace.layer_counts()
        ):
            for name, n in layer_counts.items():
                counts[layer][name] = counts[layer].get(name, 0.0) + n
    for name in ("all", "attn", "mlp", "neck"):
        result = sample_pass(model, tokenizer, CALIBRATION, plugged, plugged, name)
        layers = plugged.get(name).layers
        assert result.taken == [int(counts[layer].get(name, 0.0)) for layer in layers], name
        threshold = plugged.thresholds[layers[0]][plugged.index(name)]
        assert int((result.winning[0] > threshold).sum()) == result.taken[0], name
    assert sum(sum(c.values()) for c in counts) > 0


# --- admission ------------------------------------------------------------------------------------------------


def test_a_well_behaved_expert_passes_untouched(trained: RoutedModel, tokenizer) -> None:
    trained.plug(owner())
    try:
        shy = candidate(2.0)  # wins nothing anywhere
        result = admit(trained, tokenizer, shy, CALIBRATION)
        assert result.admitted and result.report.repair is None and result.report.problems == []
        assert torch.equal(result.expert.thresholds.cpu(), shy.thresholds)
        checks = {c.domain: c for c in result.report.domains}
        assert set(checks) == {"base", "owner", "cand"} and checks["cand"].sample == "own domain_sample"
        assert checks["base"].ppl_change == 0.0 and checks["owner"].ppl_change == 0.0
        assert result.report.steal_rates == {"owner": 0.0} and result.report.false_positive_rate == 0.0
    finally:
        trained.unplug("owner")


def test_a_greedy_expert_is_repaired_and_only_its_thresholds_move(trained: RoutedModel, tokenizer) -> None:
    trained.plug(owner())
    try:
        greedy = candidate(-2.0)  # eligible on every token: takes everything
        result = admit(trained, tokenizer, greedy, CALIBRATION)
        report = result.report
        assert result.admitted and report.repair is not None, report.problems
        repair = report.repair
        assert repair.thresholds_before == [-2.0, -2.0]
        assert all(a > b for a, b in zip(repair.thresholds_after, repair.thresholds_before, strict=True))
        assert repair.own_recall_before == [1.0, 1.0] and repair.own_recall_after is not None
        assert {c.domain: max(c.take_rates) for c in repair.unrepaired if c.domain != "cand"} == {
            "base": 1.0,
            "owner": 1.0,
        }
        for name, tensor in greedy.tensors().items():  # the adapter, key and offsets are as uploaded
            if name != "thresholds":
                assert torch.equal(result.expert.tensors()[name].cpu(), tensor), name
        # measured again, independently: the repaired candidate takes within the caps
        with_c = trained.plugged.plugging(result.expert)
        for sample, cap in ((CALIBRATION, 1e-4), (OWNER, 2e-3)):
            rates = sample_pass(trained, tokenizer, sample, with_c, with_c, "cand").take_rates()
            assert max(rates) <= cap, rates
        assert result.expert.metadata["evals"]["admission_repair"]["beside"] == ["owner"]
    finally:
        trained.unplug("owner")


def test_refuse_mode_names_the_domain_it_would_harm_and_by_how_much(trained: RoutedModel, tokenizer) -> None:
    trained.plug(owner())
    try:
        loud = candidate(-2.0, up_scale=3.0)  # takes everything and its adapter is wrong for every text
        limits = AdmissionLimits(mode="refuse")
        result = admit(trained, tokenizer, loud, CALIBRATION, limits)
        assert not result.admitted and result.report.repair is None
        owner_check = next(c for c in result.report.domains if c.domain == "owner")
        assert owner_check.ppl_change > 5e-3
        expected = (
            f"it would raise token-mode perplexity on expert 'owner''s domain_sample by {owner_check.ppl_change:+.3%}"
        )
        assert any(p.startswith(expected) for p in result.report.problems), result.report.problems
        assert any("steal rate on expert 'owner''s domain_sample is 100.0000%" in p for p in result.report.problems)
        assert torch.equal(result.expert.thresholds.cpu(), loud.thresholds), "refuse mode changes nothing"
        assert trained.plugged.names == ("owner",)
    finally:
        trained.unplug("owner")


def test_the_plugged_sets_baseline_is_cached(trained: RoutedModel, tokenizer, monkeypatch) -> None:
    calls: list[str | None] = []
    real = admission_module.sample_pass

    def counting(model, tok, strings, plugged, scoring=None, name=None, max_tokens=128):
        calls.append(name)
        return real(model, tok, strings, plugged, scoring, name, max_tokens)

    monkeypatch.setattr(admission_module, "sample_pass", counting)
    cache = BaselineCache()
    trained.plug(owner())
    try:
        first = admit(trained, tokenizer, candidate(2.0, name="first"), CALIBRATION, cache=cache)
        assert first.admitted and calls.count(None) == 3, "base, owner, and its own sample without it"
        calls.clear()
        admit(trained, tokenizer, candidate(2.0, name="again"), CALIBRATION, cache=cache)
        assert calls.count(None) == 1, "only its own sample: base and owner come from the cache"
        trained.plug(first.expert)  # the set the first admission created: its passes are that set's baseline
        calls.clear()
        admit(trained, tokenizer, candidate(2.0, name="third"), CALIBRATION, cache=cache)
        assert calls.count(None) == 1, calls
    finally:
        for name in ("first", "owner"):
            if name in trained.plugged:
                trained.unplug(name)
