"""The routed model on every supported family: exactness, padding, plug/unplug semantics, mixed modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe import Expert, ExpertNameTakenError, RoutedModel, RoutingSpec, UnknownExpertError
from moe.dispatch import grouped_dispatch, reference_dispatch
from moe.plugged import LayerAdapter
from moe.router import choose_experts, decide_sequence, gate_scores
from tests.tiny import FAMILIES, tiny_backbone

HIDDEN = 32


def routed(family: str = "llama") -> tuple[RoutedModel, torch.nn.Module]:
    """A routed model and an untouched copy of the same backbone to compare against."""
    plain = tiny_backbone(family, seed=0)
    return RoutedModel(tiny_backbone(family, seed=0)), plain


def expert(name: str, seed: int, threshold: float = 0.0, layers=(0, 1), offset: float = 0.0) -> Expert:
    g = torch.Generator().manual_seed(seed)
    e = Expert.fresh(name, HIDDEN, layers, rank=4, generator=g)
    e.up = torch.randn(e.up.shape, generator=g) * 0.5
    e.thresholds = torch.full_like(e.thresholds, threshold)
    e.offsets = torch.full_like(e.offsets, offset)
    return e


def ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_exact_backbone_without_experts_off_mode_and_all_base(family: str) -> None:
    model, plain = routed(family)
    x = ids()
    want = plain(x).logits
    assert torch.equal(model(x).logits, want)  # nothing plugged
    model.plug(expert("always", 1, threshold=-5.0))
    model.plug(expert("never", 2, threshold=5.0))
    out = model(x, routing=[RoutingSpec("off"), RoutingSpec("token", allow=("never",))])
    assert torch.equal(out.logits, want)  # off, and a row whose only allowed expert never passes
    assert out.trace.row_counts() == [{"always": 0, "never": 0, "base": 18.0}] * 2
    routed_out = model(x)  # token mode: 'always' takes everything, so the logits change
    assert not torch.allclose(routed_out.logits, want)
    assert routed_out.trace.row_counts()[0]["always"] == 18.0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_batched_equals_unbatched_with_padding(family: str, side: str) -> None:
    model, _ = routed(family)
    model.plug(expert("a", 1, threshold=0.0))
    model.plug(expert("b", 2, threshold=0.05))
    long, short = ids(1, 9, seed=3), ids(1, 5, seed=4)
    pad = torch.zeros(1, 4, dtype=torch.long)
    batch = torch.cat([long, torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)])
    mask = torch.ones_like(batch)
    if side == "left":
        mask[1, :4] = 0
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    else:
        mask[1, 5:] = 0
        position_ids = None
    out = model(batch, attention_mask=mask, position_ids=position_ids)
    alone_long, alone_short = model(long), model(short)
    torch.testing.assert_close(out.logits[0], alone_long.logits[0], atol=1e-5, rtol=1e-4)
    real = slice(4, None) if side == "left" else slice(0, 5)
    torch.testing.assert_close(out.logits[1, real], alone_short.logits[0], atol=1e-5, rtol=1e-4)
    # padding is not counted: the short row has 5 tokens x 2 layers of decisions
    assert sum(out.trace.row_counts()[1].values()) == 10
    assert out.trace.row_counts()[1] == pytest.approx(alone_short.trace.row_counts()[0])


@torch.no_grad()
def test_mixed_modes_in_one_batch_match_each_alone() -> None:
    model, plain = routed()
    model.plug(expert("a", 1, threshold=0.0))
    model.plug(expert("b", 2, threshold=0.0))
    x = ids(4, 7)
    specs = [RoutingSpec("off"), RoutingSpec("pin", "b"), RoutingSpec(), RoutingSpec("token", allow=("a",))]
    out = model(x, routing=specs)
    for row, spec in enumerate(specs):
        alone = model(x[row : row + 1], routing=[spec])
        torch.testing.assert_close(out.logits[row], alone.logits[0], atol=1e-5, rtol=1e-4)
    assert torch.equal(out.logits[0], plain(x).logits[0]), "the off row is the backbone, bit for bit"
    counts = out.trace.row_counts()
    assert counts[1] == {"a": 0, "b": 14, "base": 0}
    assert counts[3]["b"] == 0 and counts[3]["a"] > 0


@torch.no_grad()
def test_pin_on_uncovered_layer_takes_base() -> None:
    model, _ = routed()
    model.plug(expert("only0", 1, layers=(0,)))
    out = model(ids(1, 6), routing=[RoutingSpec("pin", "only0")])
    assert out.trace.row_counts() == [{"only0": 6, "base": 6}]
    assert out.trace.layer_counts() == [{"only0": 6, "base": 0}, {"only0": 0, "base": 6}]


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
    model.plug(expert("a", 1, threshold=-0.1))
    before = model.plugged
    choice_a = _choices(model, x)
    model.plug(expert("b", 2, threshold=-0.1))
    after = model.plugged
    assert torch.equal(after.keys[:, :1], before.keys) and torch.equal(after.offsets[:, :1], before.offsets)
    choice_ab = _choices(model, x)
    moved = 0
    for layer in range(2):
        changed = choice_a[layer] != choice_ab[layer]
        assert bool((choice_ab[layer][changed] == 1).all()), "a token may only move to the new expert"
        moved += int(changed.sum())
    assert moved > 0, "the test needs b to win some tokens"
    # unplugging a sends its tokens to b where b is eligible, else to base
    model.unplug("a")
    choice_b = _choices(model, x)
    for layer in range(2):
        was_a = choice_ab[layer] == 0
        assert bool((choice_b[layer][choice_ab[layer] == 1] == 0).all())  # b's tokens stay with b (now index 0)
        assert bool((choice_b[layer][choice_ab[layer] == -1] == -1).all())  # base tokens stay on base
        plugged_b = model.plugged
        inputs = model(x, routing=[RoutingSpec("off")] * 3, capture_mlp_inputs=True).mlp_inputs[layer]
        score_b = gate_scores(
            F.normalize(inputs.reshape(-1, HIDDEN), dim=-1), plugged_b.keys[layer], plugged_b.offsets[layer]
        )[:, 0]
        eligible_b = score_b > plugged_b.thresholds[layer, 0]
        assert torch.equal(choice_b[layer][was_a], torch.where(eligible_b[was_a], 0, -1))


def test_plugged_set_state_after_each_plug_and_unplug() -> None:
    model, _ = routed()
    a, b, c = expert("a", 1), expert("b", 2, layers=(1,)), expert("c", 3)
    model.plug(a)
    model.plug(b)
    model.plug(c)
    state = model.plugged
    assert state.names == ("a", "b", "c") and state.version == 3
    assert state.covers.tolist() == [[True, False, True], [True, True, True]]
    assert state.thresholds[0, 1] == float("inf")
    assert state.adapters[0][1] is None and state.adapters[1][1] is not None
    model.unplug("b")
    assert model.plugged.names == ("a", "c") and model.plugged.covers.tolist() == [[True, True], [True, True]]
    assert state.names == ("a", "b", "c"), "an old snapshot never changes"
    with pytest.raises(ExpertNameTakenError, match="already plugged"):
        model.plug(expert("a", 9))
    new_a = expert("a", 9)
    model.plug(new_a, replace=True)
    assert model.plugged.names == ("a", "c")
    assert torch.equal(model.plugged.get("a").up, new_a.up)
    with pytest.raises(UnknownExpertError, match="no expert named 'zzz'"):
        model.unplug("zzz")
    model.unplug("a")
    model.unplug("c")
    assert model.plugged.names == () and model.plugged.keys.shape == (2, 0, HIDDEN)


@torch.no_grad()
def test_unknown_names_in_routing_are_refused() -> None:
    model, _ = routed()
    model.plug(expert("a", 1))
    with pytest.raises(UnknownExpertError, match="'nope'"):
        model(ids(1, 3), routing=[RoutingSpec("pin", "nope")])
    with pytest.raises(UnknownExpertError, match="'nope'"):
        model(ids(1, 3), routing=[RoutingSpec("token", allow=("a", "nope"))])


@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_dispatch_equals_reference_loop(top_k: int) -> None:
    g = torch.Generator().manual_seed(0)
    n, experts = 40, 5
    x, base = torch.randn(n, HIDDEN, generator=g), torch.randn(n, HIDDEN, generator=g)
    adapters = tuple(
        LayerAdapter(torch.randn(HIDDEN, 4, generator=g), torch.randn(4, HIDDEN, generator=g)) for _ in range(experts)
    )
    choice = torch.randint(-1, experts, (n, top_k), generator=g)
    if top_k == 2:  # an expert chosen twice by one token is not a real top-k outcome
        choice[:, 1] = torch.where(choice[:, 1] == choice[:, 0], -1, choice[:, 1])
    fast = grouped_dispatch(x, base, choice, adapters)
    torch.testing.assert_close(fast, reference_dispatch(x, base, choice, adapters), atol=1e-5, rtol=1e-5)
    base_rows = (choice < 0).all(dim=1)
    assert torch.equal(fast[base_rows], base[base_rows]), "base-route rows are untouched, bit for bit"


def test_gathered_dispatch_equals_reference_loop_and_keeps_base_rows() -> None:
    from moe.dispatch import gathered_dispatch

    g = torch.Generator().manual_seed(0)
    ranks = [4, 2, 4]  # mixed ranks: the stacked weights are zero-padded to the largest
    adapters = tuple(
        LayerAdapter(torch.randn(HIDDEN, r, generator=g), torch.randn(r, HIDDEN, generator=g)) for r in ranks
    )
    down = torch.zeros(3, HIDDEN, 4)
    up = torch.zeros(3, 4, HIDDEN)
    for e, a in enumerate(adapters):
        down[e, :, : ranks[e]], up[e, : ranks[e]] = a.down, a.up
    x, base = torch.randn(20, HIDDEN, generator=g), torch.randn(20, HIDDEN, generator=g)
    choice = torch.randint(-1, 3, (20,), generator=g)
    fast = gathered_dispatch(x, base, choice, down, up)
    torch.testing.assert_close(fast, reference_dispatch(x, base, choice[:, None], adapters), atol=1e-5, rtol=1e-5)
    assert torch.equal(fast[choice < 0], base[choice < 0])


@torch.no_grad()
def test_decode_sized_and_prefill_sized_batches_agree() -> None:
    """The gathered path (<= GATHER_MAX_TOKENS tokens) and the grouped path give the same logits."""
    from moe import routed as routed_module

    model, _ = routed()
    model.plug(expert("a", 1, threshold=0.0))
    model.plug(expert("b", 2, threshold=0.0, layers=(1,)))
    x = ids(2, 10)
    gathered = model(x)
    limit = routed_module.GATHER_MAX_TOKENS
    routed_module.GATHER_MAX_TOKENS = 0
    try:
        grouped = model(x)
    finally:
        routed_module.GATHER_MAX_TOKENS = limit
    torch.testing.assert_close(gathered.logits, grouped.logits, atol=1e-5, rtol=1e-4)
    assert gathered.trace.row_counts() == grouped.trace.row_counts()


def test_top2_routing_in_model_matches_reference() -> None:
    from moe.router import RouterConfig

    model = RoutedModel(tiny_backbone("llama", seed=0), RouterConfig(top_k=2))
    model.plug(expert("a", 1, threshold=-0.2))
    model.plug(expert("b", 2, threshold=-0.2))
    with torch.no_grad():
        out = model(ids(2, 6))
    counts = out.trace.row_counts()[0]
    assert counts["a"] + counts["b"] + counts["base"] >= 12


def test_decide_sequence() -> None:
    names = ("math", "code")
    assert decide_sequence({"math": 30, "code": 5, "base": 65}, names, 0.25) == "math"
    assert decide_sequence({"math": 10, "code": 5, "base": 85}, names, 0.25) == "base"
    assert decide_sequence({"math": 0, "code": 0, "base": 0}, names, 0.25) == "base"
    assert decide_sequence({"base": 4}, (), 0.25) == "base"


@torch.no_grad()
def test_sequence_mode_observe_then_decide() -> None:
    from moe.router import StepRouting

    model, plain = routed()
    model.plug(expert("a", 1, threshold=-5.0))  # passes everywhere: the prompt picks it
    x = ids(1, 8)
    step = StepRouting.from_specs([RoutingSpec("sequence")], model.plugged, observe=[True])
    observed = model(x, routing=step)
    assert torch.equal(observed.logits, plain(x).logits), "observing applies no expert"
    names = model.plugged.names
    decision = decide_sequence(observed.trace.row_counts()[0], names, model.router.sequence_min_share)
    assert decision == "a"
    pinned = model(x, routing=[RoutingSpec("sequence", expert=decision)])
    assert pinned.trace.row_counts()[0] == {"a": 16, "base": 0}
