"""The integration step on a tiny model: two neighbouring domains (the same question format, a few words of their
own) that the cosine gates' counts send to one expert, and the fitted context router tells apart in sequence
mode (moe.decode.prefill); the router published with the set it was fitted for, restored by an unplug, honouring
allow-lists, and absent (the counts rule) where an expert has no domain texts."""

from __future__ import annotations

import random

import pytest
import torch

from moe import RoutedModel
from moe.adapters.expert import BASE_ROUTE
from moe.admission.report import AdmissionLimits, admit
from moe.admission.router_fit import ContextRouterFitter, capture_texts, carried_floors
from moe.admission.samples import context_sample_pass, sample_pass
from moe.decode.prefill import decide_routes, prefill
from moe.routing.context import context_means
from moe.routing.router import RoutingSpec
from tests.tiny import tiny_backbone, tiny_expert, tiny_tokenizer

SHARED = ["Question:", "Tom", "has", "3", "and", "buys", "4", "more.", "How", "many", "does", "he", "have?", "12"]
OWN_WORDS = {
    "near": ["apples", "eggs", "bread"],
    "far": ["milk", "market", "family"],
    "other": ["def", "add(a,", "b):"],
}
PROSE = [
    "The",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "near",
    "the",
    "river",
    "bank",
    "in",
    "the",
    "morning",
    "the",
    "weather",
    "was",
    "cold",
]


def _texts(domain: str, count: int, seed: int) -> list[str]:
    """Questions of shared words with one word in three the domain's own; prose for the base domain."""
    rng = random.Random(f"{domain}/{seed}")
    out = []
    for _ in range(count):
        if domain == BASE_ROUTE:
            out.append(" ".join(rng.choice(PROSE) for _ in range(12)))
            continue
        words = [rng.choice(OWN_WORDS[domain]) if rng.random() < 0.3 else rng.choice(SHARED) for _ in range(12)]
        out.append(" ".join(words))
    return out


def _expert(name: str, seed: int, offset: float):
    """An expert with an open gate (threshold -2: eligible on every token); the larger offset wins every token."""
    return tiny_expert(name, seed=seed, threshold=-2.0, offset=offset, metadata={"domain_sample": _texts(name, 32, 0)})


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = RoutedModel(tiny_backbone("llama", vocab=len(tokenizer)))
    experts = (_expert("near", 1, 0.0), _expert("far", 2, 1.0))
    model.set_experts(experts)
    fitter = ContextRouterFitter(model, tokenizer, calibration=_texts(BASE_ROUTE, 60, 0), cap=0.02)
    return model, fitter, experts


def _routes(model: RoutedModel, tokenizer, strings: list[str], spec: RoutingSpec | None = None) -> list[str]:
    ids = [tokenizer(s)["input_ids"] for s in strings]
    return decide_routes(model, ids, [spec or RoutingSpec("sequence")] * len(ids))


def _share(routes: list[str], target: str) -> float:
    return sum(r == target for r in routes) / len(routes)


def test_counts_fail_and_the_context_router_tells_neighbours_apart(setup, tokenizer) -> None:
    model, fitter, experts = setup
    held = {name: _texts(name, 24, 1) for name in ("near", "far", BASE_ROUTE)}
    assert model.plugged.context is None  # nobody fitted one: the counts rule
    # the counts: "far" wins every token (its offset), so the neighbour's prompts all go to it
    assert _share(_routes(model, tokenizer, held["near"]), "near") == 0.0
    router = fitter.offer(experts)
    assert router is not None and model.plugged.context is router
    assert router.classes == (BASE_ROUTE, "near", "far")
    # a tiny random backbone: most (not all) prompts told apart, where the counts get none
    assert _share(_routes(model, tokenizer, held["near"]), "near") >= 0.7
    assert _share(_routes(model, tokenizer, held["far"]), "far") >= 0.7
    assert _share(_routes(model, tokenizer, held[BASE_ROUTE]), BASE_ROUTE) >= 0.9
    # prefill decides sequence mode with it, and the decided row runs pinned to its expert
    ids = [tokenizer(held["near"][0])["input_ids"]]
    done = prefill(model, ids, [RoutingSpec("sequence")])
    assert done.specs[0] == RoutingSpec("sequence", expert="near")
    pinned = prefill(model, ids, [RoutingSpec("pin", "near")])
    torch.testing.assert_close(done.logits, pinned.logits)
    # an allow-list without the neighbour keeps its prompts off it
    allowed = _routes(model, tokenizer, held["near"], RoutingSpec("sequence", allow=("far",)))
    assert "near" not in allowed


def test_a_plug_refits_and_an_unplug_restores_the_router_exactly(setup, tokenizer) -> None:
    model, fitter, experts = setup
    router = fitter.offer(experts)
    before = list(_routes(model, tokenizer, _texts("near", 8, 2) + _texts("far", 8, 2)))
    other = _expert("other", 3, 0.5)
    fitter.offer((*experts, other))  # fitted before the plug (as the server's plug worker does), published with it
    assert model.plugged.context is router  # not yet: the set is still the old one
    model.plug(other)
    assert model.plugged.context is not None and model.plugged.context.classes == (BASE_ROUTE, "near", "far", "other")
    assert _share(_routes(model, tokenizer, _texts("other", 16, 2)), "other") >= 0.6  # the new class is learnt
    model.unplug("other")
    assert model.plugged.context is router  # the previous set's router, the same object
    assert _routes(model, tokenizer, _texts("near", 8, 2) + _texts("far", 8, 2)) == before
    # and a refit from scratch (a fresh fitter: nothing cached) gives the same router: the fit is deterministic
    again = ContextRouterFitter(model, tokenizer, calibration=_texts(BASE_ROUTE, 60, 0), cap=0.02).fit(experts)
    assert again is not None
    for a, b in zip((router.sequence, *router.layers), (again.sequence, *again.layers), strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and torch.equal(a.floors, b.floors)


def test_no_router_for_an_expert_without_domain_texts(setup, tokenizer) -> None:
    model, fitter, experts = setup
    bare = tiny_expert("bare", seed=4, threshold=-2.0)  # no domain sample, no examples
    assert fitter.fit((*experts, bare)) is None
    model.plug(bare)
    try:
        assert model.plugged.context is None  # the counts rule decides
        assert set(_routes(model, tokenizer, _texts("near", 4, 3))) <= {"near", "far", "bare", BASE_ROUTE}
    finally:
        model.unplug("bare")


def test_admission_reports_the_candidates_recall_under_the_refit_router(setup, tokenizer) -> None:
    model, fitter, experts = setup
    fitter.offer(experts)
    other = _expert("other", 3, 0.5)
    unlimited = AdmissionLimits(None, None, None, None)  # no repair: the recall as fitted
    report = admit(model, tokenizer, other, _texts(BASE_ROUTE, 6, 4), unlimited, router_fitter=fitter).report
    routing = report.context_routing
    assert routing is not None and routing["texts"] == 32
    assert routing["sequence_recall"] >= 0.6 and routing["token_recall"] > 0.3, routing
    assert routing["sequence_false_positive_rate"] <= 0.1 and routing["token_false_positive_rate"] <= 0.1, routing
    assert report.notes == []  # it would serve its domain
    assert model.plugged.names == ("near", "far")  # nothing was plugged
    assert admit(model, tokenizer, other, _texts(BASE_ROUTE, 6, 4)).report.context_routing is None  # not asked
    assert set(routing["sequence_steal_rates"]) == {"near", "far"}
    assert all(0.0 <= r <= 0.2 for r in routing["sequence_steal_rates"].values()), routing["sequence_steal_rates"]
    oracle = routing["sequence_oracle"]  # its own sample as routed vs pinned to it (sequence mode)
    assert oracle["texts"] == 32 and oracle["routed_to_it"] == routing["sequence_recall"]
    assert abs(oracle["oracle_gap"] - (oracle["ppl_routed"] / oracle["ppl_pinned"] - 1)) < 1e-12


def _twin() -> object:
    """A candidate whose domain sample is drawn from "near"'s own words: under the refit router it takes a
    quarter of near's token decisions (measured unrepaired below)."""
    return tiny_expert("twin", seed=5, threshold=-2.0, offset=0.5, metadata={"domain_sample": _texts("near", 32, 7)})


def test_a_neighbours_thief_gets_its_floors_raised_and_serves_with_them(setup, tokenizer) -> None:
    model, fitter, experts = setup
    router_before = fitter.offer(experts)
    near_sample = _texts("near", 32, 0)  # near's domain sample (what admission measures its steal rate on)
    nll_before = sample_pass(model, tokenizer, near_sample, model.plugged).nll
    # perplexity limits loose (a refit moves every expert's decisions a little), the take caps as the server's
    limits = AdmissionLimits(max_base_ppl_increase=0.02, max_domain_ppl_increase=0.02)
    admission = admit(model, tokenizer, _twin(), _texts(BASE_ROUTE, 6, 4), limits, router_fitter=fitter)
    report = admission.report
    assert report.admitted, report.problems
    repair = report.repair
    assert repair is not None and repair.raised == "floors"
    unrepaired = {c.domain: max(c.take_rates) for c in repair.unrepaired}
    assert unrepaired["near"] > 0.1, unrepaired  # it would have stolen from its neighbour
    assert repair.thresholds_after == repair.thresholds_before  # the expert itself is as uploaded
    assert all(a > b for a, b in zip(repair.floors_after, repair.floors_before, strict=True)), repair
    assert repair.own_recall_after is not None and max(repair.own_recall_after) < max(repair.own_recall_before)
    assert report.steal_rates["near"] <= limits.max_steal_rate and report.false_positive_rate <= 1e-4
    assert report.context_routing is not None and report.context_routing["routed_by"] == "context router"

    # plugged as the server does (fit the new set's router, then plug): it serves with the repaired floors, and
    # near's sample stays within the steal cap under the router that serves
    twin = admission.expert
    served = fitter.offer((*experts, twin))
    model.plug(twin)
    try:
        assert model.plugged.context is served
        assert served.token_floors("twin", list(twin.layers)) == repair.floors_after
        steal = context_sample_pass(model, tokenizer, near_sample, model.plugged, "twin")
        assert max(steal.take_rates()) <= limits.max_steal_rate, steal.take_rates()
    finally:
        model.unplug("twin")
    assert model.plugged.context is router_before  # the unplug restores the router, the same object
    assert sample_pass(model, tokenizer, near_sample, model.plugged).nll == nll_before  # and near's scores exactly


def test_a_thief_whose_floors_cannot_meet_the_limits_is_refused(setup, tokenizer) -> None:
    model, fitter, experts = setup
    fitter.offer(experts)
    # the server's limits: with its floors raised it takes nothing, yet the refit moves the general text's
    # perplexity past +0.02% (the other experts' decisions change with the refit)
    report = admit(model, tokenizer, _twin(), _texts(BASE_ROUTE, 6, 4), router_fitter=fitter).report
    assert not report.admitted and report.repair is not None and report.repair.raised == "floors"
    assert any("general calibration text" in p for p in report.problems), report.problems
    assert model.plugged.names == ("near", "far")  # nothing was plugged


def test_the_gates_path_ignores_a_fitter_without_token_classifiers(tokenizer) -> None:
    model = RoutedModel(tiny_backbone("llama", vocab=len(tokenizer)))
    experts = (_expert("near", 1, 0.0), _expert("far", 2, 1.0))
    model.set_experts(experts)
    calibration = _texts(BASE_ROUTE, 6, 4)
    sequence_only = ContextRouterFitter(model, tokenizer, calibration=_texts(BASE_ROUTE, 60, 0), cap=0.02, token=False)
    with_fitter = admit(model, tokenizer, _twin(), calibration, router_fitter=sequence_only).report
    gates = admit(model, tokenizer, _twin(), calibration).report
    measured = [[(c.domain, c.take_rates, c.ppl_after) for c in r.domains] for r in (with_fitter, gates)]
    assert measured[0] == measured[1]  # the passes ran under the gates, as without a fitter
    assert with_fitter.steal_rates == gates.steal_rates and with_fitter.admitted == gates.admitted
    assert with_fitter.repair == gates.repair
    assert with_fitter.context_routing["routed_by"] == "gates (no token classifiers)"


def test_a_later_plug_keeps_an_earlier_repair(setup, tokenizer) -> None:
    """The repaired floors travel in the expert's file (evals.admission_repair): a refit for a later plug, or a
    fresh fitter (a restarted server), keeps at least them; the unplug of the later expert restores the router."""
    model, fitter, experts = setup
    fitter.offer(experts)
    limits = AdmissionLimits(max_base_ppl_increase=0.02, max_domain_ppl_increase=0.02)
    admission = admit(model, tokenizer, _twin(), _texts(BASE_ROUTE, 6, 4), limits, router_fitter=fitter)
    assert admission.report.admitted and admission.report.repair is not None
    twin, repaired = admission.expert, admission.report.repair.floors_after
    assert carried_floors(twin) == dict(zip(twin.layers, repaired, strict=True))
    assert carried_floors(_twin()) == {}  # as uploaded: nothing to carry
    layers = list(twin.layers)
    # a fresh fitter (nothing cached): the set with the repaired twin is fitted with its repair
    fresh = ContextRouterFitter(model, tokenizer, calibration=_texts(BASE_ROUTE, 60, 0), cap=0.02)
    assert fresh.fit((*experts, twin)).token_floors("twin", layers) == repaired
    assert fresh.fit((*experts, _twin())).token_floors("twin", layers) != repaired  # without it: the fit's own
    served = fitter.offer((*experts, twin))
    model.plug(twin)
    try:
        later = _expert("other", 3, 0.5)
        refit = fitter.offer((*experts, twin, later))
        model.plug(later)
        assert model.plugged.context is refit and refit.classes == (BASE_ROUTE, "near", "far", "twin", "other")
        assert all(a >= b for a, b in zip(refit.token_floors("twin", layers), repaired, strict=True))
        model.unplug("other")
        assert model.plugged.context is served  # the router with the repair, the same object
    finally:
        model.unplug("twin")


def test_a_context_sample_pass_equals_the_plain_loop_over_texts(setup, tokenizer) -> None:
    """The pass computes a padded batch's context means at once; per text it equals context_means on that text's
    MLP inputs alone (as they flowed in token mode), read by each layer's classifier."""
    model, fitter, experts = setup
    router = fitter.offer(experts)
    strings = _texts("far", 6, 5) + ["Tom has 3", _texts(BASE_ROUTE, 1, 5)[0]]  # rows of different lengths
    result = context_sample_pass(model, tokenizer, strings, model.plugged, "far", batch_size=4)
    c = router.classes.index("far")
    flows = capture_texts(model, tokenizer, strings, spec=RoutingSpec(), plugged=model.plugged)
    for i, layer in enumerate(model.plugged.get("far").layers):
        expected = []
        for x in flows:
            best, choice = router.layers[layer].probabilities(context_means(x, router.skip)[:, layer]).max(dim=-1)
            win = torch.where(choice == c, best, torch.full_like(best, float("-inf")))
            win[: router.skip] = float("-inf")
            expected.append(win)
        torch.testing.assert_close(result.winning[i], torch.cat(expected))
        assert result.taken[i] == int((torch.cat(expected) > router.layers[layer].floors[c]).sum())
    assert result.decisions == sum(len(x) for x in flows)
