"""The bottleneck kind (moe.adapters.bottleneck): its adapter, file fields and slot storage, and its dispatch: the
grouped (prefill, training), slot (decode: dense and gathered) and routed-rows (eager CPU decode) paths against
the plain per-token loop (moe.adapters.reference)."""

from __future__ import annotations

import pytest
import torch

from moe.adapters.bottleneck import (
    BOTTLENECK,
    AdapterReferences,
    BottleneckAdapter,
    BottleneckSlots,
    LayerAdapter,
    grouped_dispatch,
    routed_rows_dispatch,
    slot_dispatch,
)
from moe.adapters.reference import reference_dispatch
from moe.model.backbone import BackboneFingerprint
from tests.tiny import HIDDEN, VOCAB, tiny_expert


def random_adapters(ranks: list[int], seed: int = 0) -> tuple[LayerAdapter, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(LayerAdapter(torch.randn(HIDDEN, r, generator=g), torch.randn(r, HIDDEN, generator=g)) for r in ranks)


def stacked(layer: tuple[LayerAdapter, ...], free: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """down [H, C, R], up [C, R, H]: every adapter zero-padded to the largest rank, as slot storage holds one
    layer, with `free` empty slots after them (C = adapters + free)."""
    rank = max(a.down.shape[1] for a in layer)
    slots = len(layer) + free
    down, up = torch.zeros(HIDDEN, slots, rank), torch.zeros(slots, rank, HIDDEN)
    for e, a in enumerate(layer):
        down[:, e, : a.down.shape[1]], up[e, : a.down.shape[1]] = a.down, a.up
    return down, up


# slot_dispatch runs dense when C <= N tokens, gathered otherwise: both forms, by the number of free slots
FORMS = {"dense": 0, "gathered": 40}


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


@pytest.mark.parametrize("form", list(FORMS))
def test_slot_dispatch_equals_reference_loop_and_keeps_base_rows(form: str) -> None:
    g = torch.Generator().manual_seed(0)
    ranks = [4, 2, 4]  # mixed ranks: the slot weights are zero-padded to the largest
    adapters = tuple(
        LayerAdapter(torch.randn(HIDDEN, r, generator=g), torch.randn(r, HIDDEN, generator=g)) for r in ranks
    )
    down, up = stacked(adapters, FORMS[form])
    x, base = torch.randn(20, HIDDEN, generator=g), torch.randn(20, HIDDEN, generator=g)
    choice = torch.randint(-1, 3, (20,), generator=g)
    fast = slot_dispatch(x, base, choice, down, up)
    torch.testing.assert_close(fast, reference_dispatch(x, base, choice[:, None], adapters), atol=1e-5, rtol=1e-5)
    assert torch.equal(fast[choice < 0], base[choice < 0])


# choice columns per token: every pattern the two paths special-case
CHOICES = {
    "all base": [[-1], [-1], [-1], [-1]],
    "one expert": [[2], [2], [2], [2]],
    "the last expert only": [[-1], [3], [-1], [3]],
    "two neighbouring experts": [[1], [2], [-1], [1]],  # routed_rows_dispatch: their range as one adapter
    "two experts apart": [[0], [-1], [3], [0]],  # routed_rows_dispatch: each on its rows
    "every expert": [[0], [1], [2], [3]],
    "top-2 some empty": [[0, 1], [-1, -1], [3, -1], [2, 0]],
    "top-2 all base": [[-1, -1], [-1, -1], [-1, -1], [-1, -1]],
}


@pytest.mark.parametrize("case", list(CHOICES))
def test_grouped_dispatch_cases(case: str) -> None:
    layer = random_adapters([4, 2, 4, 1])
    g = torch.Generator().manual_seed(1)
    x, base = torch.randn(4, HIDDEN, generator=g), torch.randn(4, HIDDEN, generator=g)
    choice = torch.tensor(CHOICES[case])
    before = base.clone()
    out = grouped_dispatch(x, base, choice, layer)
    torch.testing.assert_close(out, reference_dispatch(x, base, choice, layer), atol=1e-5, rtol=1e-5)
    if (choice < 0).all():
        assert out is base, "nothing routed: the base output itself, no copy"
    else:
        assert out is not base and torch.equal(base, before), "base is never written in place"


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", [c for c in CHOICES if len(CHOICES[c][0]) == 1])
def test_slot_dispatch_cases(case: str, form: str) -> None:
    layer = random_adapters([4, 2, 4, 1])
    g = torch.Generator().manual_seed(1)
    x, base = torch.randn(4, HIDDEN, generator=g), torch.randn(4, HIDDEN, generator=g)
    choice = torch.tensor(CHOICES[case])[:, 0]
    out = slot_dispatch(x, base, choice, *stacked(layer, FORMS[form]))
    torch.testing.assert_close(out, reference_dispatch(x, base, choice[:, None], layer), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[choice < 0], base[choice < 0])


@pytest.mark.parametrize("free", [0, 40])
@pytest.mark.parametrize("case", [c for c in CHOICES if len(CHOICES[c][0]) == 1])
def test_routed_rows_dispatch_cases(case: str, free: int) -> None:
    """The eager CPU decode form: the reference loop's result, base rows bit for bit, `base` itself (no copy, no
    adapter run) when nothing routed, and base never written in place."""
    layer = random_adapters([4, 2, 4, 1])
    g = torch.Generator().manual_seed(1)
    x, base = torch.randn(4, HIDDEN, generator=g), torch.randn(4, HIDDEN, generator=g)
    choice = torch.tensor(CHOICES[case])[:, 0]
    before = base.clone()
    out = routed_rows_dispatch(x, base, choice, *stacked(layer, free))
    torch.testing.assert_close(out, reference_dispatch(x, base, choice[:, None], layer), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[choice < 0], base[choice < 0]) and torch.equal(base, before)
    assert (out is base) == bool((choice < 0).all())
    # the caller's read of the choices (a step that counts on the host) gives the same result, bit for bit
    assert torch.equal(routed_rows_dispatch(x, base, choice, *stacked(layer, free), choice.tolist()), out)


def test_routed_rows_dispatch_keeps_base_rows_whatever_their_inputs() -> None:
    """The range form runs every row through the range's adapter and zeroes the blocks a row did not choose: a base
    row whose input overflows the adapter (inf, nan) still comes back as base, bit for bit."""
    down, up = stacked(random_adapters([4, 4, 2]), free=3)
    g = torch.Generator().manual_seed(4)
    x, base = torch.randn(5, HIDDEN, generator=g), torch.randn(5, HIDDEN, generator=g)
    x[1], x[3, :4] = float("inf"), float("nan")
    choice = torch.tensor([0, -1, 1, -1, 1])
    out = routed_rows_dispatch(x, base, choice, down, up)
    assert torch.equal(out[[1, 3]], base[[1, 3]])
    routed = [0, 2, 4]
    want = reference_dispatch(x[routed], base[routed], choice[routed, None], random_adapters([4, 4, 2]))
    torch.testing.assert_close(out[routed], want, atol=1e-5, rtol=1e-5)


def test_routed_rows_dispatch_equals_slot_dispatch_on_random_batches() -> None:
    g = torch.Generator().manual_seed(3)
    down, up = stacked(random_adapters([4, 2, 4], seed=3), free=5)
    for n in (1, 7, 33):
        x, base = torch.randn(n, HIDDEN, generator=g), torch.randn(n, HIDDEN, generator=g)
        choice = torch.randint(-1, 3, (n,), generator=g)
        torch.testing.assert_close(
            routed_rows_dispatch(x, base, choice, down, up),
            slot_dispatch(x, base, choice, down, up),
            atol=1e-5,
            rtol=1e-5,
        )


def test_top2_token_takes_the_mean_of_its_two_adapters() -> None:
    layer = random_adapters([4, 4])
    g = torch.Generator().manual_seed(2)
    x, base = torch.randn(1, HIDDEN, generator=g), torch.randn(1, HIDDEN, generator=g)
    one = grouped_dispatch(x, base, torch.tensor([[0]]), layer) - base
    other = grouped_dispatch(x, base, torch.tensor([[1]]), layer) - base
    both = grouped_dispatch(x, base, torch.tensor([[0, 1]]), layer) - base
    torch.testing.assert_close(both, (one + other) / 2, atol=1e-5, rtol=1e-5)


def test_nothing_plugged_is_the_base_output() -> None:
    x, base = torch.randn(3, HIDDEN), torch.randn(3, HIDDEN)
    choice = torch.full((3,), -1)
    assert slot_dispatch(x, base, choice, torch.zeros(HIDDEN, 0, 0), torch.zeros(0, 0, HIDDEN)) is base
    assert grouped_dispatch(x, base, choice[:, None], ()) is base


def test_gradients_reach_only_the_chosen_adapters() -> None:
    """Training runs through grouped dispatch: an adapter gets a gradient exactly when it won a token."""
    layer = tuple(LayerAdapter(a.down.requires_grad_(), a.up.requires_grad_()) for a in random_adapters([4, 4, 4]))
    x, base = torch.randn(5, HIDDEN), torch.randn(5, HIDDEN)
    grouped_dispatch(x, base, torch.tensor([[0], [-1], [2], [0], [-1]]), layer).sum().backward()
    assert layer[0].down.grad is not None and layer[0].down.grad.abs().sum() > 0
    assert layer[1].down.grad is None and layer[1].up.grad is None
    assert layer[2].up.grad is not None and layer[2].up.grad.abs().sum() > 0


# --- the adapter, its file fields and its slot storage ------------------------------------------------------


def test_fresh_adapter_changes_nothing_and_its_weightless_copy_keeps_shapes() -> None:
    adapter = BottleneckAdapter.fresh(3, HIDDEN, 4, torch.Generator().manual_seed(0), None)
    assert (adapter.rank, adapter.num_layers) == (4, 3) and not adapter.up.any()
    meta = adapter.weightless()
    assert meta.down.is_meta and meta.up.is_meta
    assert {k: (t.shape, t.dtype) for k, t in meta.tensors().items()} == {
        k: (t.shape, t.dtype) for k, t in adapter.tensors().items()
    }


def test_file_fields_shapes_and_tensors() -> None:
    adapter = tiny_expert("b", seed=1, rank=4, layers=(0, 1)).adapter
    fingerprint = BackboneFingerprint("llama", HIDDEN, 2, VOCAB, "0" * 16)
    assert BOTTLENECK.file_fields(adapter) == {} and BOTTLENECK.parse_fields({"kind": "bottleneck"}) is None
    assert BOTTLENECK.file_shapes(None, 2, 4, fingerprint) == {"down": (2, HIDDEN, 4), "up": (2, 4, HIDDEN)}
    assert not BOTTLENECK.is_float32("down") and BOTTLENECK.slot_rank(adapter) == 4
    again = BOTTLENECK.from_tensors(adapter.tensors(), None)
    assert again.down is adapter.down and again.up is adapter.up


def test_slot_storage_writes_reads_and_clears_one_slot() -> None:
    """A slot holds the adapter zero-padded to the storage's rank; another kind's adapter (or forget) clears it."""
    storage = BottleneckSlots(
        num_layers=3, hidden=HIDDEN, capacity=2, rank=2, device=torch.device("cpu"), dtype=torch.float32
    )
    storage.resize(4, 6)
    adapter = tiny_expert("b", seed=2, rank=5, layers=(2, 0)).adapter
    storage.write(3, (2, 0), adapter)
    back = storage.read(3, (2, 0), adapter.weightless())
    assert torch.equal(back.down, adapter.down) and torch.equal(back.up, adapter.up)
    assert not storage.down[1, :, 3].any() and not storage.down[2, :, 3, 5:].any(), "other layers, padding: zero"
    layout = storage.layout([frozenset(), frozenset(), frozenset(), frozenset({0, 2})], live=False)
    assert layout.adapters[0][3] is not None and layout.adapters[1][3] is None and layout.adapters[0][2] is None
    assert layout.fixed[2][0].data_ptr() == storage.down[2].data_ptr(), "the decode path reads views, not copies"
    storage.write(3, (0,), object())  # another kind's expert takes the slot
    assert not storage.down[:, :, 3].any() and not storage.up[:, 3].any() and storage.ranks[3] == 0
    references = AdapterReferences(num_layers=3, capacity=1)
    references.write(0, (1,), adapter.__class__(adapter.down[:1], adapter.up[:1]))
    layout = references.layout([frozenset({1})], live=False)
    assert layout.fixed is None and layout.adapters[1][0].down.data_ptr() == adapter.down.data_ptr()
