"""moe.routing.context: the running context, the fitted classifiers and their floors, the decode step, on
synthetic MLP inputs whose domains overlap token by token but not as sequences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe.adapters.expert import BASE_ROUTE
from moe.routing.context import (
    ContextGates,
    ContextRouter,
    cap_floor,
    context_features,
    context_means,
    context_step,
    fit_classifier,
    fit_context_router,
    fit_floors,
)

LAYERS, HIDDEN, SKIP = 2, 16, 1


def _vocabulary(seed: int, size: int) -> torch.Tensor:
    return F.normalize(torch.randn(size, LAYERS, HIDDEN, generator=torch.Generator().manual_seed(seed)), dim=-1)


# experts "near" and "far" share most of their tokens (COMMON); each has a few words of its own; base has its own
COMMON, BASE_WORDS = _vocabulary(1, 6), _vocabulary(2, 6)
OWN = {"near": _vocabulary(3, 3), "far": _vocabulary(4, 3), "other": _vocabulary(5, 3)}


def _texts(domain: str, count: int, seed: int, length: int = 24, own_share: float = 0.3) -> list[torch.Tensor]:
    """Texts x [T, L, H]: a prefix token (the same in every text), then tokens that are the domain's own words
    with probability own_share and shared words otherwise, with noise."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.full((1, LAYERS, HIDDEN), 3.0)
    texts = []
    for _ in range(count):
        words = BASE_WORDS if domain == BASE_ROUTE else COMMON
        picked = words[torch.randint(len(words), (length,), generator=g)]  # [T, L, H]
        if domain != BASE_ROUTE:
            own = OWN[domain][torch.randint(len(OWN[domain]), (length,), generator=g)]
            picked = torch.where((torch.rand(length, generator=g) < own_share)[:, None, None], own, picked)
        scale = 1 + torch.rand(length, 1, 1, generator=g)
        texts.append(torch.cat([prefix, picked * scale + 0.2 * torch.randn(length, LAYERS, HIDDEN, generator=g)]))
    return texts


def _fit(domains: tuple[str, ...], seed: int = 0):
    experts = {d: _texts(d, 64, seed + 10 + i) for i, d in enumerate(domains)}  # 64: a domain sample's size
    # cap 1%: the held-out base text here is 24 x 24 positions, where 0.1% would let no single position pass
    base, heldout = _texts(BASE_ROUTE, 24, seed + 1), _texts(BASE_ROUTE, 24, seed + 2)
    return fit_context_router(experts, base, heldout, SKIP, cap=0.01)


@pytest.fixture(scope="module")
def router():
    return _fit(("near", "far"))


def test_context_means_equal_the_plain_loop() -> None:
    x = torch.randn(7, LAYERS, HIDDEN, generator=torch.Generator().manual_seed(0))
    means = context_means(x, skip=2)
    assert torch.equal(means[:2], torch.zeros(2, LAYERS, HIDDEN))
    for t in range(2, 7):
        for layer in range(LAYERS):
            total = sum(F.normalize(x[s, layer], dim=-1) for s in range(2, t + 1))
            torch.testing.assert_close(means[t, layer], F.normalize(total, dim=-1))
    # each token counts by its direction only: scaling one token changes nothing
    scaled = x.clone()
    scaled[3] *= 50.0
    torch.testing.assert_close(context_means(scaled, skip=2), means)


def test_context_features_have_norm_one_after_the_prefix() -> None:
    x = torch.randn(5, LAYERS, HIDDEN)
    features = context_features(x, skip=1)
    assert features.shape == (5, LAYERS * HIDDEN)
    assert torch.equal(features[0], torch.zeros(LAYERS * HIDDEN))
    torch.testing.assert_close(features[1:].norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize(
    ("winning", "total", "cap", "expected"),
    [
        ([0.9, 0.8, 0.7], 1000, 1e-3, 0.8),  # one of 1000 may pass: the floor is the second best
        ([0.9, 0.8, 0.7], 1000, 0.0, 0.9),  # none may pass: p > 0.9 fails for all
        ([0.9, 0.8], 1000, 2e-3, 0.0),  # both may pass: no floor needed
        ([], 10, 0.0, 0.0),
    ],
)
def test_cap_floor(winning: list[float], total: int, cap: float, expected: float) -> None:
    scores = torch.tensor(winning)
    floor = cap_floor(scores, total, cap)
    assert floor == pytest.approx(expected)
    assert int((scores > floor).sum()) <= int(cap * total)


def test_fit_classifier_refuses_bad_classes() -> None:
    features, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="must start with 'base'"):
        fit_classifier(features, labels, ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"no samples for classes \['c'\]"):
        fit_classifier(features, labels.clamp(max=1), (BASE_ROUTE, "b", "c"))


def test_floors_cap_the_base_positions_each_expert_takes() -> None:
    """Base and the expert overlap (half the expert's points lie among base's): the floors keep the expert's
    take of held-out base points within the cap, where the plain argmax takes many."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 8, generator=g)
    expert = torch.cat([torch.randn(100, 8, generator=g) + 2.0, torch.randn(100, 8, generator=g)])
    features = torch.cat([base, expert])
    labels = torch.cat([torch.zeros(400, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    classifier = fit_classifier(features, labels, (BASE_ROUTE, "e"))
    held = torch.randn(2000, 8, generator=g)
    assert float((classifier.decide(held) == 1).float().mean()) > 0.05
    capped = fit_floors(classifier, held, cap=0.01)
    assert float((capped.decide(held) == 1).float().mean()) <= 0.01
    assert float((capped.decide(torch.randn(50, 8, generator=g) + 4.0) == 1).float().mean()) >= 0.9


def test_input_space_folds_the_standardisation(router) -> None:
    features = torch.randn(9, LAYERS * HIDDEN)
    weight, bias = router.sequence.input_space()
    torch.testing.assert_close(features @ weight.T + bias, router.sequence.logits(features), rtol=1e-4, atol=1e-4)


def test_router_tells_overlapping_domains_apart(router) -> None:
    """70% of the experts' tokens are shared words; the sequence decides, and the token decisions once the
    context holds a few tokens."""
    assert router.classes == (BASE_ROUTE, "near", "far")
    for domain in ("near", "far", BASE_ROUTE):
        held = _texts(domain, 40, seed=100 + len(domain))
        routes = [router.sequence_route(x, SKIP) for x in held]
        assert routes.count(domain) >= 38, (domain, routes)
        tokens = torch.cat([router.token_routes(x, SKIP)[SKIP + 8 :] for x in held])  # [N, L]
        share = float((tokens == router.classes.index(domain)).float().mean())
        assert share >= (0.99 if domain == BASE_ROUTE else 0.75), (domain, share)
        if domain != BASE_ROUTE:  # one token alone cannot tell the neighbours apart: most words are shared
            alone = torch.cat(
                [
                    gate.decide(F.normalize(x[SKIP:, layer], dim=-1))
                    for x in held
                    for layer, gate in enumerate(router.layers)
                ]
            )
            assert float((alone == router.classes.index(domain)).float().mean()) < 0.6


def test_sequence_route_of_a_prefix_alone_is_base(router) -> None:
    assert router.sequence_route(torch.randn(SKIP, LAYERS, HIDDEN), SKIP) == BASE_ROUTE


def test_decode_step_equals_the_batched_token_routes(router) -> None:
    """context_step run token by token (two rows of different lengths side by side) gives token_routes."""
    texts = [_texts("near", 1, seed=7)[0], _texts("far", 1, seed=8, length=16)[0]]
    expected = [router.token_routes(x, SKIP) for x in texts]
    for layer, gate in enumerate(router.layers):
        weight, bias = gate.input_space()
        sums = torch.zeros(2, HIDDEN)  # the rows' state after the prefix
        for t in range(SKIP, len(texts[0])):
            live = [row for row, x in enumerate(texts) if t < len(x)]
            x = torch.stack([texts[row][t, layer] for row in live])
            state = sums[live]
            routes = context_step(state, x, weight, bias, gate.floors if gate.floored else None)
            sums[live] = state
            for i, row in enumerate(live):
                assert int(routes[i]) == int(expected[row][t, layer]), (row, t, layer)


def test_decode_step_without_floors_is_the_argmax(router) -> None:
    gate = router.layers[0].with_floors(torch.zeros(len(router.classes)))
    assert not gate.floored
    weight, bias = gate.input_space()
    x = torch.randn(5, HIDDEN)
    plain = context_step(torch.zeros(5, HIDDEN), x, weight, bias, None)
    floored = context_step(torch.zeros(5, HIDDEN), x, weight, bias, gate.floors)
    assert torch.equal(plain, floored) and torch.equal(plain, gate.decide(F.normalize(x, dim=-1)))


def _previous_step(gates, context, layer, x, counted, allowed, forced, covers) -> torch.Tensor:
    """ContextGates' layer step as it was before the decode step was trimmed (every shape through the cumulative
    sum, stacked tensors indexed per call): the reference its decisions and sums must equal bit for bit."""
    unit = F.normalize(x.float(), dim=-1) * counted[..., None]
    sums = context[:, layer, None, :] + unit.cumsum(dim=1)
    context[:, layer] = sums[:, -1]
    sums = sums.reshape(-1, x.shape[-1])
    logits = torch.addmm(gates.bias[layer], F.normalize(sums, dim=-1), gates.weight[layer].T)
    if allowed is not None:
        logits[:, 1:] = logits[:, 1:].masked_fill(~allowed, float("-inf"))
    if gates.floored:
        best, column = logits.softmax(dim=-1).max(dim=-1)
        column = torch.where(best > gates.floors[layer][column], column, 0)
    else:
        column = logits.argmax(dim=-1)
    choice = column - 1
    choice = torch.where((choice >= 0) & covers[choice.clamp(min=0)] & counted.reshape(-1), choice, -1)
    if forced is not None:
        pin = torch.where(covers[forced.clamp(min=0)], forced, -1)
        choice = torch.where(forced >= 0, pin, choice)
    return choice


def _floored(router: ContextRouter, floors: torch.Tensor) -> ContextRouter:
    """router with these floors on every layer."""
    return ContextRouter(router.sequence, tuple(gate.with_floors(floors) for gate in router.layers), router.skip)


@pytest.mark.parametrize("floored", [False, True])
@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("restricted", [False, True])
def test_gates_step_equals_the_previous_step_bit_for_bit(router, floored, length, restricted) -> None:
    """The layer step a forward runs (decode: one token per row, in place) takes the same decisions and leaves
    the same running sums as before, with floors or without, allow-lists, pins and a slot that skips a layer."""
    trimmed = _floored(router, router.layers[0].floors if floored else torch.zeros(len(router.classes)))
    # slots 2 and 0 hold the classes (capacity 4: slots 1 and 3 free), as a plugged set lays them out
    g = torch.Generator().manual_seed(11)
    rows = 6
    context = torch.randn(rows, LAYERS, HIDDEN, generator=g)
    context[0] = 0  # a row with no context yet
    x = torch.cat([_texts("near", 3, seed=21, length=length)[i][SKIP:][None] for i in range(3)])
    x = torch.cat([x, torch.cat([_texts("far", 3, seed=22, length=length)[i][SKIP:][None] for i in range(3)])])
    counted = torch.ones(rows, length, dtype=torch.bool)
    counted[1, 0] = False  # padding or the prefix
    covers = torch.tensor([True, False, True, True])  # slot 1 (free) skips; slots 2 and 0 cover
    allowed = forced = None
    if restricted:
        allowed = torch.ones(rows * length, 4, dtype=torch.bool)
        allowed[: length * 2, 2] = False
        forced = torch.full((rows * length,), -1)
        forced[-length:] = 0
    if restricted and not floored:
        covers = torch.tensor([True, False, False, True])  # slot 2 (class "near") skips this layer
    # the set's covers go into the gates (a win by a slot that skips the layer is base); a step passes its pins'
    gates = ContextGates.of(trimmed, [2, 0], 4, torch.device("cpu"), covers.expand(LAYERS, -1))
    assert gates.floored == floored
    for layer in range(LAYERS):
        before, after = context.clone(), context.clone()
        expected = _previous_step(gates, before, layer, x[:, :, layer], counted, allowed, forced, covers)
        got = gates.step(after, layer, x[:, :, layer], counted, allowed, forced, covers)
        assert torch.equal(got, expected), (layer, got, expected)
        assert torch.equal(after, before), layer
        assert (got >= 0).any() and (got < 0).any()  # both an expert and base were chosen


@pytest.mark.parametrize("floored", [False, True])
@pytest.mark.parametrize("all_counted", [True, False])
@pytest.mark.parametrize("skipping", [False, True])
def test_step_read_equals_step_bit_for_bit(router, floored, all_counted, skipping) -> None:
    """The eager decode step decided on the host (`step_read`: an addcdiv where every row counts, the wins decided
    from the read column) takes `step`'s decisions, as a list, and leaves the same running sums, bit for bit: with
    floors or without, rows that do not count, and a slot that skips the layer (its wins go to base)."""
    floors = router.layers[0].floors if floored else torch.zeros(len(router.classes))
    if floored:  # a floor that binds on some rows (the fitted ones rarely do on these texts)
        floors = floors.clone()
        floors[1] = 0.9
    trimmed = _floored(router, floors)
    g = torch.Generator().manual_seed(12)
    rows = 8
    context = torch.randn(rows, LAYERS, HIDDEN, generator=g)
    context[0] = 0  # a row with no context yet
    x = torch.cat(
        [
            _texts(name, 4, seed=seed, length=1)[i][SKIP:][None]
            for name, seed in (("near", 31), ("far", 32))
            for i in range(4)
        ]
    )  # [rows, 1, L, H]
    x[3, 0, :] *= 1e-20  # a tiny input: its norm is clamped
    counted = torch.ones(rows, 1, dtype=torch.bool)
    if not all_counted:
        counted[5, 0] = counted[2, 0] = False  # free rows of a bucket
    covers = torch.tensor([True, False, not skipping, True])  # slot 2 (class "near") skips when `skipping`
    gates = ContextGates.of(trimmed, [2, 0], 4, torch.device("cpu"), covers.expand(LAYERS, -1))
    weights = None if all_counted else counted.float()
    chosen = set()
    for layer in range(LAYERS):
        before, after = context.clone(), context.clone()
        expected = gates.step(before, layer, x[:, :, layer], counted, None, None, None, counted.float())
        sums = after[:, layer]  # the view a forward hands it (context.unbind(1)[layer])
        read = gates.step_read(sums, layer, x[:, 0, layer].contiguous(), counted[:, 0].tolist(), weights)
        assert read == expected.tolist(), (layer, read, expected)
        assert torch.equal(after, before), layer
        chosen.update(read)
    assert -1 in chosen and len(chosen) > 1  # both an expert and base were chosen
    if not all_counted:
        assert read[2] == read[5] == -1


def test_refit_is_a_function_of_the_set(router) -> None:
    """Plugging a third expert refits over three; unplugging it and refitting gives the first router back
    exactly (the plugged set can keep the value it was fitted with, too)."""
    bigger = _fit(("near", "far", "other"))
    assert bigger.classes == (BASE_ROUTE, "near", "far", "other")
    again = _fit(("near", "far"))
    for before, after in zip((router.sequence, *router.layers), (again.sequence, *again.layers), strict=True):
        assert before.classes == after.classes
        for name in ("center", "scale", "weight", "bias", "floors"):
            assert torch.equal(getattr(before, name), getattr(after, name)), name
    # the third expert's own texts go to it, and the first two keep theirs
    held = _texts("other", 20, seed=300)
    assert sum(bigger.sequence_route(x, SKIP) == "other" for x in held) >= 19
    assert sum(bigger.sequence_route(x, SKIP) == "near" for x in _texts("near", 20, seed=301)) >= 19
    assert math.isfinite(float(bigger.sequence.floors.sum()))
