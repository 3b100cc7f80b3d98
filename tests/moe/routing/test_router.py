"""The router: scores, thresholds, top-k, pins and allow-lists, routing specs, StepRouting, sequence decisions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe import RoutedModel, RoutingSpec, RoutingSpecError, UnknownExpertError
from moe.adapters.expert import BASE_ROUTE
from moe.adapters.slots import PluggedSet
from moe.routing.router import RouterConfig, StepRouting, choose_experts, decide_sequence, gate_scores
from tests.tiny import HIDDEN, tiny_backbone, tiny_expert


def routed() -> tuple[RoutedModel, torch.nn.Module]:
    """A routed model and an untouched copy of the same backbone to compare against."""
    plain = tiny_backbone("llama", seed=0)
    return RoutedModel(tiny_backbone("llama", seed=0)), plain


def ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_choice(
    scores: torch.Tensor,
    thresholds: torch.Tensor,
    allowed: torch.Tensor,
    forced: torch.Tensor,
    covers: torch.Tensor,
    top_k: int,
) -> list[list[int]]:
    """choose_experts as a plain loop: per token, its pin where covered, else its top-k eligible experts."""
    out = []
    for n in range(scores.shape[0]):
        k = min(top_k, scores.shape[1])
        if forced[n] >= 0:
            pin = int(forced[n]) if covers[forced[n]] else -1
            out.append([pin] + [-1] * (k - 1))
            continue
        eligible = [e for e in range(scores.shape[1]) if scores[n, e] > thresholds[e] and allowed[n, e]]
        best = sorted(eligible, key=lambda e: -float(scores[n, e]))[:k]
        out.append(best + [-1] * (k - len(best)))
    return out


# --- scores and choices -----------------------------------------------------------------------------------


def test_gate_scores_are_cosine_plus_offset() -> None:
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(7, HIDDEN, generator=g), torch.randn(3, HIDDEN, generator=g)
    offsets = torch.tensor([0.0, 0.5, -0.25])
    scores = gate_scores(F.normalize(x, dim=-1), F.normalize(keys, dim=-1), offsets)
    for n in range(7):
        for e in range(3):
            want = F.cosine_similarity(x[n], keys[e], dim=0) + offsets[e]
            assert float(scores[n, e]) == pytest.approx(float(want), abs=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3, 5])
@pytest.mark.parametrize("restricted", [False, True], ids=["all-allowed", "allow-and-pins"])
def test_choose_experts_equals_the_plain_loop(top_k: int, restricted: bool) -> None:
    g = torch.Generator().manual_seed(top_k)
    n, experts = 50, 4
    scores = torch.rand(n, experts, generator=g) * 2 - 1
    thresholds = torch.tensor([0.0, 0.2, -0.3, float("inf")])  # the last never passes (an uncovered layer)
    covers = torch.tensor([True, True, True, False])
    if restricted:
        allowed = torch.rand(n, experts, generator=g) > 0.3
        forced = torch.where(torch.rand(n, generator=g) > 0.7, torch.randint(0, experts, (n,), generator=g), -1)
    else:
        allowed, forced = torch.ones(n, experts, dtype=torch.bool), torch.full((n,), -1)
    choice = choose_experts(scores, thresholds, allowed, forced, covers, top_k)
    assert choice.shape == (n, min(top_k, experts))
    assert choice.tolist() == reference_choice(scores, thresholds, allowed, forced, covers, top_k)
    if not restricted:  # no allow-list and no pins (None) is the same choice
        assert torch.equal(choose_experts(scores, thresholds, None, None, covers, top_k), choice)


def test_threshold_is_strict_and_offsets_count() -> None:
    scores = torch.tensor([[0.5, 0.5], [0.50001, 0.4]])
    thresholds = torch.tensor([0.5, 0.3])
    covers = torch.ones(2, dtype=torch.bool)
    assert choose_experts(scores, thresholds, None, None, covers, 1).tolist() == [[1], [0]]
    assert choose_experts(scores, thresholds, None, None, covers, 2).tolist() == [[1, -1], [0, 1]]
    closed = torch.full((2,), 2.0)
    assert choose_experts(scores, closed, None, None, covers, 2).tolist() == [[-1, -1], [-1, -1]], "all base"


def test_a_pin_wins_over_any_score_and_takes_base_where_uncovered() -> None:
    scores = torch.tensor([[0.9, -0.9], [0.9, -0.9]])
    thresholds = torch.tensor([0.0, 5.0])  # expert 1 is never eligible by score
    forced = torch.tensor([1, 1])
    assert choose_experts(scores, thresholds, None, forced, torch.tensor([True, True]), 2).tolist() == [[1, -1]] * 2
    assert choose_experts(scores, thresholds, None, forced, torch.tensor([True, False]), 1).tolist() == [[-1]] * 2


def test_router_config_bounds() -> None:
    assert RouterConfig() == RouterConfig(top_k=1, sequence_min_share=0.25)
    with pytest.raises(ValueError, match="top_k"):
        RouterConfig(top_k=0)
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="sequence_min_share"):
            RouterConfig(sequence_min_share=share)


# --- routing specs and StepRouting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "banana"}, "is not one of"),
        ({"mode": "pin"}, "needs an expert name"),
        ({"mode": "token", "expert": "a"}, "takes no expert"),
        ({"mode": "off", "expert": "a"}, "takes no expert"),
    ],
)
def test_bad_routing_specs_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(RoutingSpecError, match=message):
        RoutingSpec(**kwargs)


def _plugged() -> PluggedSet:
    """a on layers 0 and 1, b on layer 1 only."""
    empty = PluggedSet.empty(2, HIDDEN, torch.device("cpu"), torch.float32)
    return empty.plugging(tiny_expert("a", seed=1)).plugging(tiny_expert("b", seed=2, layers=(1,)))


# (specs, observe) -> allowed rows, forced, apply, routes_anything, all_token_mode, applies_everywhere
STEP_CASES = [
    ("token", [RoutingSpec()], None, [[1, 1]], [-1], [1], True, True, True),
    ("off", [RoutingSpec("off")], None, [[0, 0]], [-1], [1], False, False, True),
    ("pin", [RoutingSpec("pin", "b")], None, [[0, 0]], [1], [1], True, False, True),
    ("allow", [RoutingSpec(allow=("b",))], None, [[0, 1]], [-1], [1], True, False, True),
    ("allow none", [RoutingSpec(allow=())], None, [[0, 0]], [-1], [1], False, False, True),
    # an empty expert name is none (a client's `"expert": ""` beside token mode; schemathesis found it as a 500)
    ("token, empty expert", [RoutingSpec("token", "")], None, [[1, 1]], [-1], [1], True, True, True),
    ("undecided sequence", [RoutingSpec("sequence")], None, [[1, 1]], [-1], [1], True, True, True),
    ("decided sequence", [RoutingSpec("sequence", "a")], None, [[0, 0]], [0], [1], True, False, True),
    ("sequence on base", [RoutingSpec("sequence", "base")], None, [[0, 0]], [-1], [1], False, False, True),
    (
        "observed",
        [RoutingSpec("sequence"), RoutingSpec()],
        [True, False],
        [[1, 1], [1, 1]],
        [-1, -1],
        [0, 1],
        True,
        True,
        False,
    ),
    (
        "mixed",
        [RoutingSpec("off"), RoutingSpec("pin", "a"), RoutingSpec()],
        None,
        [[0, 0], [0, 0], [1, 1]],
        [-1, 0, -1],
        [1, 1, 1],
        True,
        False,
        True,
    ),
]


@pytest.mark.parametrize(
    ("case", "specs", "observe", "allowed", "forced", "apply", "anything", "all_token", "everywhere"),
    STEP_CASES,
    ids=[c[0] for c in STEP_CASES],
)
def test_step_routing_from_specs(case, specs, observe, allowed, forced, apply, anything, all_token, everywhere) -> None:
    step = StepRouting.from_specs(specs, _plugged(), observe=observe)
    assert step.allowed.tolist() == [[bool(v) for v in row] for row in allowed]
    assert step.forced.tolist() == forced
    assert step.apply.tolist() == [bool(v) for v in apply]
    assert (step.routes_anything, step.all_token_mode, step.applies_everywhere) == (anything, all_token, everywhere)


def test_step_routing_with_nothing_plugged_routes_nothing() -> None:
    empty = PluggedSet.empty(2, HIDDEN, torch.device("cpu"), torch.float32)
    step = StepRouting.from_specs([RoutingSpec(), RoutingSpec("sequence")], empty)
    assert step.allowed.shape == (2, 0) and step.routes_anything is False


@pytest.mark.parametrize(
    "spec",
    [
        RoutingSpec("pin", "ghost"),
        RoutingSpec(allow=("a", "ghost")),
        RoutingSpec("sequence", "ghost"),
        # a name the row does not route by is still refused (as check_against refuses it)
        RoutingSpec("off", allow=("ghost",)),
        RoutingSpec("pin", "a", allow=("ghost",)),
        RoutingSpec("sequence", BASE_ROUTE, allow=("a", "ghost")),
    ],
    ids=repr,
)
def test_step_routing_refuses_names_that_are_not_plugged(spec: RoutingSpec) -> None:
    with pytest.raises(UnknownExpertError, match="no expert named 'ghost' is plugged"):
        spec.check_against(_plugged())
    with pytest.raises(UnknownExpertError, match="no expert named 'ghost' is plugged"):
        StepRouting.from_specs([RoutingSpec(), spec], _plugged())


@torch.no_grad()
def test_unknown_names_in_routing_are_refused() -> None:
    model, _ = routed()
    model.plug(tiny_expert("a", seed=1, threshold=0.0))
    with pytest.raises(UnknownExpertError, match="'nope'"):
        model(ids(1, 3), routing=[RoutingSpec("pin", "nope")])
    with pytest.raises(UnknownExpertError, match="'nope'"):
        model(ids(1, 3), routing=[RoutingSpec("token", allow=("a", "nope"))])


# --- plugging never changes another expert's scores --------------------------------------------------------


def _choices(model: RoutedModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, each token's slot-0 expert name index in the current set (-1 base), on backbone inputs."""
    inputs = model(x, routing=[RoutingSpec("off")] * x.shape[0], capture_mlp_inputs=True).mlp_inputs
    plugged, out = model.plugged, []
    for layer, h in enumerate(inputs):
        unit = F.normalize(h.reshape(-1, HIDDEN), dim=-1)
        scores = gate_scores(unit, plugged.keys[layer], plugged.offsets[layer])
        allowed = torch.ones_like(scores, dtype=torch.bool)
        forced = torch.full((unit.shape[0],), -1)
        out.append(choose_experts(scores, plugged.thresholds[layer], allowed, forced, plugged.covers[layer], 1)[:, 0])
    return out


@torch.no_grad()
def test_plugging_b_keeps_a_scores_and_moves_only_tokens_b_wins() -> None:
    model, _ = routed()
    x = ids(3, 12)
    model.plug(tiny_expert("a", seed=1, threshold=-0.1))
    a = model.plugged.index("a")
    gate_a = [t[:, a].clone() for t in (model.plugged.keys, model.plugged.offsets, model.plugged.thresholds)]
    choice_a = _choices(model, x)
    model.plug(tiny_expert("b", seed=2, threshold=-0.1))
    after = model.plugged
    b = after.index("b")
    assert (a, b) == (0, 1), "slots are taken lowest first"
    assert all(
        torch.equal(t[:, a], want)
        for t, want in zip((after.keys, after.offsets, after.thresholds), gate_a, strict=False)
    )
    choice_ab = _choices(model, x)
    moved = 0
    for layer in range(2):
        changed = choice_a[layer] != choice_ab[layer]
        assert bool((choice_ab[layer][changed] == b).all()), "a token may only move to the new expert"
        moved += int(changed.sum())
    assert moved > 0, "the test needs b to win some tokens"
    # unplugging a sends its tokens to b where b is eligible, else to base; b keeps its slot
    model.unplug("a")
    assert model.plugged.index("b") == b
    choice_b = _choices(model, x)
    for layer in range(2):
        was_a = choice_ab[layer] == a
        assert bool((choice_b[layer][choice_ab[layer] == b] == b).all())  # b's tokens stay with b
        assert bool((choice_b[layer][choice_ab[layer] == -1] == -1).all())  # base tokens stay on base
        plugged_b = model.plugged
        inputs = model(x, routing=[RoutingSpec("off")] * 3, capture_mlp_inputs=True).mlp_inputs[layer]
        score_b = gate_scores(
            F.normalize(inputs.reshape(-1, HIDDEN), dim=-1), plugged_b.keys[layer], plugged_b.offsets[layer]
        )[:, b]
        eligible_b = score_b > plugged_b.thresholds[layer, b]
        assert torch.equal(choice_b[layer][was_a], torch.where(eligible_b[was_a], b, -1))


# --- sequence mode ----------------------------------------------------------------------------------------


def test_decide_sequence() -> None:
    names = ("math", "code")
    assert decide_sequence({"math": 30, "code": 5, "base": 65}, names, 0.25) == "math"
    assert decide_sequence({"math": 10, "code": 5, "base": 85}, names, 0.25) == "base"
    assert decide_sequence({"math": 0, "code": 0, "base": 0}, names, 0.25) == "base"
    assert decide_sequence({"base": 4}, (), 0.25) == "base"


@pytest.mark.parametrize(
    ("counts", "names", "share", "route"),
    [
        ({"math": 25, "code": 0, "base": 75}, ("math", "code"), 0.25, "math"),  # exactly the share wins
        ({"math": 20, "code": 30, "base": 50}, ("math", "code"), 0.25, "code"),  # the most-chosen wins
        ({"math": 20, "code": 30, "base": 50}, ("math",), 0.25, "base"),  # only `names` may win
        ({"math": 60, "base": 40}, ("math", "code"), 1.0, "base"),  # share 1: every decision needed
        ({"math": 4}, ("math",), 1.0, "math"),
        ({}, ("math",), 0.25, "base"),
    ],
)
def test_decide_sequence_table(counts: dict, names: tuple, share: float, route: str) -> None:
    assert decide_sequence(counts, names, share) == route


@torch.no_grad()
def test_sequence_mode_observe_then_decide() -> None:
    model, plain = routed()
    model.plug(tiny_expert("a", seed=1, threshold=-5.0))  # passes everywhere: the prompt picks it
    x = ids(1, 8)
    step = StepRouting.from_specs([RoutingSpec("sequence")], model.plugged, observe=[True])
    observed = model(x, routing=step)
    assert torch.equal(observed.logits, plain(x).logits), "observing applies no expert"
    names = model.plugged.names
    decision = decide_sequence(observed.trace.row_counts()[0], names, model.router.sequence_min_share)
    assert decision == "a"
    pinned = model(x, routing=[RoutingSpec("sequence", expert=decision)])
    assert pinned.trace.row_counts()[0] == {"a": 16, "base": 0}
