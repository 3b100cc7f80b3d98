"""The plugged experts: after every plug, replace and unplug, the whole state equals one spelled out by a plain
loop - for sets built from experts (training, what-ifs) and for the live slot storage, whose plugs and unplugs
touch one slot whatever the number plugged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe import Expert, ExpertNameTakenError, IncompatibleExpertError, RoutedModel, UnknownExpertError
from moe.adapters.slots import DEFAULT_CAPACITY, ExpertSlots, PluggedSet
from tests.tiny import HIDDEN, tiny_backbone, tiny_expert, tiny_lora_expert

LAYERS = 2


def assert_gates(plugged: PluggedSet, experts: list[Expert], slots: list[int]) -> None:
    """Every gate column of `plugged` against `experts` in `slots`, layer by layer; every other column free."""
    capacity = plugged.capacity
    assert plugged.keys.shape == (LAYERS, capacity, HIDDEN)
    assert plugged.offsets.shape == plugged.thresholds.shape == plugged.covers.shape == (LAYERS, capacity)
    assert plugged.columns == tuple(experts[slots.index(c)].name if c in slots else None for c in range(capacity)), (
        "columns name each slot's expert, None where free"
    )
    for layer in range(LAYERS):
        for c in range(capacity):
            expert = experts[slots.index(c)] if c in slots else None
            if expert is None or layer not in expert.layers:  # never eligible, nothing a pin may use
                assert not plugged.covers[layer, c] and plugged.thresholds[layer, c] == float("inf")
                assert plugged.layouts["bottleneck"].adapters[layer][c] is None
                if expert is not None:
                    assert plugged.offsets[layer, c] == 0 and not plugged.keys[layer, c].any()
                continue
            i = expert.layers.index(layer)
            assert plugged.covers[layer, c]
            torch.testing.assert_close(plugged.keys[layer, c], F.normalize(expert.keys[i], dim=0))
            assert plugged.offsets[layer, c] == expert.offsets[i]
            assert plugged.thresholds[layer, c] == expert.thresholds[i]
            adapter = plugged.layouts["bottleneck"].adapters[layer][c]
            assert torch.equal(adapter.down, expert.down[i]) and torch.equal(adapter.up, expert.up[i])


def assert_state(plugged: PluggedSet, experts: list[Expert], version: int) -> None:
    """A set built from experts: slot i holds experts[i], adapters reference the experts' own tensors (gradients
    reach them) and there is no second copy of the weights."""
    count = len(experts)
    assert plugged.names == tuple(e.name for e in experts) and len(plugged) == count
    assert plugged.version == version
    assert all(a is b for a, b in zip(plugged.experts, experts, strict=True))
    assert plugged.slots == tuple(range(count)) and plugged.capacity == count
    assert plugged.slot_by_name == {e.name: i for i, e in enumerate(experts)}
    assert plugged.eager_only, "a set of references has no fixed-op decode form"
    assert plugged.layouts["bottleneck"].down is None and plugged.layouts["bottleneck"].up is None, (
        "no stacked copy of the weights"
    )
    assert len(plugged.layouts["bottleneck"].adapters) == LAYERS and all(
        len(row) == count for row in plugged.layouts["bottleneck"].adapters
    )
    assert_gates(plugged, experts, list(range(count)))
    for layer in range(LAYERS):
        for e, expert in enumerate(experts):
            if layer in expert.layers:
                i, adapter = expert.layers.index(layer), plugged.layouts["bottleneck"].adapters[layer][e]
                assert adapter.down.data_ptr() == expert.down[i].data_ptr(), "adapters reference the expert's tensors"
                assert adapter.up.data_ptr() == expert.up[i].data_ptr()


def assert_slots(model: RoutedModel, experts: list[Expert], version: int) -> None:
    """The live storage: every column (gates, the slot weights zero-padded to the largest rank and zero on layers
    an expert skips), the names in plug order, weightless handles, and each expert read back exactly."""
    plugged, storage = model.plugged, model.slots
    assert plugged is storage.snapshot(), "the model's set is the storage's current snapshot, set where it changes"
    slots = [plugged.index(e.name) for e in experts]
    assert plugged.names == tuple(e.name for e in experts) and len(plugged) == len(experts)
    assert plugged.slot_by_name == dict(zip(plugged.names, slots, strict=True))
    assert plugged.capacity == storage.capacity and not plugged.eager_only and not storage.eager_only
    assert plugged.version == version and plugged.slots == tuple(slots)
    assert len(set(slots)) == len(slots)
    assert_gates(plugged, experts, slots)
    rank = storage.rank
    assert (
        plugged.layouts["bottleneck"].down is storage.weights["bottleneck"].down
        and plugged.layouts["bottleneck"].up is storage.weights["bottleneck"].up
    )
    assert plugged.layouts["bottleneck"].down.shape == (LAYERS, HIDDEN, plugged.capacity, rank)
    assert plugged.layouts["bottleneck"].up.shape == (LAYERS, plugged.capacity, rank, HIDDEN)
    for expert, slot, handle in zip(experts, slots, plugged.experts, strict=True):
        assert handle.down.device.type == "meta", "the set keeps no copy of the weights"
        assert (handle.name, handle.layers, handle.rank, handle.nbytes) == (
            expert.name,
            expert.layers,
            expert.rank,
            expert.nbytes,
        )
        assert (handle.description, handle.examples, handle.metadata) == (
            expert.description,
            expert.examples,
            expert.metadata,
        )
        for layer in range(LAYERS):
            if layer not in expert.layers:
                assert (
                    not plugged.layouts["bottleneck"].down[layer, :, slot].any()
                    and not plugged.layouts["bottleneck"].up[layer, slot].any()
                )
                continue
            i = expert.layers.index(layer)
            assert torch.equal(plugged.layouts["bottleneck"].down[layer, :, slot, : expert.rank], expert.down[i])
            assert torch.equal(plugged.layouts["bottleneck"].up[layer, slot, : expert.rank], expert.up[i])
            assert not plugged.layouts["bottleneck"].down[layer, :, slot, expert.rank :].any()
            assert not plugged.layouts["bottleneck"].up[layer, slot, expert.rank :].any()
        back = plugged.read(expert.name)
        for key in ("down", "up", "offsets", "thresholds"):
            assert torch.equal(back.tensors()[key], expert.tensors()[key]), key
        torch.testing.assert_close(back.keys, F.normalize(expert.keys, dim=-1))
    assert storage.nbytes() == sum(
        t.numel() * t.element_size()
        for t in (
            storage.keys,
            storage.offsets,
            storage.thresholds,
            storage.covers,
            plugged.layouts["bottleneck"].down,
            plugged.layouts["bottleneck"].up,
            *(getattr(storage.context_gates, name) for name in ("weight", "bias", "floors", "passing", "open")),
        )
    )


def empty() -> PluggedSet:
    return PluggedSet.empty(LAYERS, HIDDEN, torch.device("cpu"), torch.float32)


# --- sets built from experts ------------------------------------------------------------------------------


def test_plugged_set_state_after_every_plug_replace_and_unplug() -> None:
    a = tiny_expert("a", seed=1, offset=0.1, threshold=0.2)
    b = tiny_expert("b", seed=2, layers=(1,), rank=2)
    c = tiny_expert("c", seed=3, layers=(1, 0), rank=8)  # layers in any order
    state = empty()
    assert_state(state, [], 0)
    state = state.plugging(a)
    assert_state(state, [a], 1)
    state = state.plugging(b)
    assert_state(state, [a, b], 2)
    snapshot = state.plugging(c)
    assert_state(snapshot, [a, b, c], 3)
    new_b = tiny_expert("b", seed=9, layers=(0,))
    state = snapshot.plugging(new_b, replace=True)  # in place: plug order is kept
    assert_state(state, [a, new_b, c], 4)
    assert_state(snapshot, [a, b, c], 3)  # an old set never changes
    state = state.unplugging("a")
    assert_state(state, [new_b, c], 5)
    state = state.unplugging("c").unplugging("b")
    assert_state(state, [], 7)


@pytest.mark.parametrize(
    ("expert", "error", "message"),
    [
        (tiny_expert("wide", hidden=64), IncompatibleExpertError, "hidden size 64, the backbone has 32"),
        (tiny_expert("deep", layers=(0, 2)), IncompatibleExpertError, "covers layers [0, 2]"),
        (tiny_expert("twice", layers=(1, 1)), IncompatibleExpertError, "each may appear once"),
        (tiny_expert("a", seed=5), ExpertNameTakenError, "already plugged"),
    ],
)
def test_refused_plugs_leave_the_set_as_it_was(expert: Expert, error: type, message: str) -> None:
    state = empty().plugging(tiny_expert("a", seed=1))
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        state.plugging(expert)
    with pytest.raises(UnknownExpertError, match="no expert named 'zzz' is plugged; plugged: \\['a'\\]"):
        state.unplugging("zzz")
    assert_state(state, [state.experts[0]], 1)

    model = RoutedModel(tiny_backbone("llama", seed=0))  # the live storage refuses the same way
    a = tiny_expert("a", seed=1)
    model.plug(a)
    before = [t.clone() for t in (model.slots.keys, model.slots.thresholds, model.slots.weights["bottleneck"].down)]
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        model.plug(expert)
    assert_slots(model, [a], 1)
    after = (model.slots.keys, model.slots.thresholds, model.slots.weights["bottleneck"].down)
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True)), "a refused plug writes nothing"


def test_lookups() -> None:
    a, b = tiny_expert("a", seed=1), tiny_expert("b", seed=2)
    state = empty().plugging(a).plugging(b)
    assert state.index("b") == 1 and state.get("a") is a and state.read("a") is a
    assert "a" in state and "base" not in state and "zzz" not in state
    with pytest.raises(UnknownExpertError, match="plugged: none"):
        empty().get("a")


# --- the live slot storage --------------------------------------------------------------------------------


def test_slot_state_after_each_plug_replace_and_unplug() -> None:
    """Through the model: plug writes one slot (the lowest free), replace takes a fresh slot and frees the old
    one, unplug frees its slot for the next plug; plug order is kept; old snapshots keep their names."""
    model = RoutedModel(tiny_backbone("llama", seed=0))
    a = tiny_expert("a", seed=1, threshold=0.0, description="adds", examples=("1 + 1",), metadata={"k": 1})
    b = tiny_expert("b", seed=2, threshold=0.0, layers=(1,))
    c = tiny_expert("c", seed=3, threshold=0.0, rank=8)  # a larger rank: the storage grows its rank
    model.plug(a)
    model.plug(b)
    assert_slots(model, [a, b], 2)
    assert model.slots.rank == 4
    model.plug(c)
    state = model.plugged
    assert_slots(model, [a, b, c], 3)
    assert model.slots.rank == 8 and state.slots == (0, 1, 2) and state.capacity == DEFAULT_CAPACITY
    assert state.covers.tolist()[0][:3] == [True, False, True] and state.thresholds[0, 1] == float("inf")
    assert state.layouts["bottleneck"].adapters[0][1] is None and state.layouts["bottleneck"].adapters[1][1] is not None
    model.unplug("b")
    assert model.plugged.names == ("a", "c") and model.plugged.columns[:3] == ("a", None, "c")
    assert_slots(model, [a, c], 4)
    assert state.names == ("a", "b", "c") and state.thresholds[1, 1] != float("inf"), "an old snapshot keeps its own"
    with pytest.raises(ExpertNameTakenError, match="already plugged"):
        model.plug(tiny_expert("a", seed=9, threshold=0.0))
    new_a = tiny_expert("a", seed=9, threshold=0.0)
    model.plug(new_a, replace=True)  # into the lowest free slot (b's old one); a's slot is freed
    assert model.plugged.names == ("a", "c") and model.plugged.slots == (1, 2)
    assert_slots(model, [new_a, c], 5)
    with pytest.raises(UnknownExpertError, match="no expert named 'zzz'"):
        model.unplug("zzz")
    d = tiny_expert("d", seed=4, layers=(0,), rank=2)
    model.plug(d)  # reuses slot 0: nothing of a's is left in it
    assert model.plugged.slots == (1, 2, 0)
    assert_slots(model, [new_a, c, d], 6)
    for name in ("a", "c", "d"):
        model.unplug(name)
    assert model.plugged.names == () and model.plugged.columns == (None,) * DEFAULT_CAPACITY
    assert_slots(model, [], 9)


def test_capacity_doubles_keeping_every_slot() -> None:
    storage = ExpertSlots(LAYERS, HIDDEN, torch.device("cpu"), torch.float32, capacity=2, rank=4)
    experts = [tiny_expert(f"e{i}", seed=i, threshold=0.1 * i, layers=(0, 1) if i % 2 else (1,)) for i in range(5)]
    generations = []
    for expert in experts:
        storage.plug(expert)
        generations.append((storage.capacity, storage.generation))
    assert generations == [(2, 0), (2, 0), (4, 1), (4, 1), (8, 2)], "capacity doubles when full, and only then"
    plugged = storage.snapshot()
    assert plugged.slots == (0, 1, 2, 3, 4) and plugged.columns[5:] == (None, None, None)
    assert_gates(plugged, experts, [0, 1, 2, 3, 4])
    for expert in experts:
        back = plugged.read(expert.name)
        assert torch.equal(back.down, expert.down) and torch.equal(back.up, expert.up)


def _slot_tensors(storage: ExpertSlots) -> list[torch.Tensor]:
    return [
        storage.keys,
        storage.offsets,
        storage.thresholds,
        storage.covers,
        storage.weights["bottleneck"].down,
        storage.weights["bottleneck"].up,
    ]


def _column(tensors: list[torch.Tensor], slot: int) -> list[torch.Tensor]:
    """Everything of one slot: gate columns [L, ...] and weights (down's slot sits on dim 2)."""
    keys, offsets, thresholds, covers, down, up = tensors
    return [keys[:, slot], offsets[:, slot], thresholds[:, slot], covers[:, slot], down[:, :, slot], up[:, slot]]


@pytest.mark.parametrize("plugged", [8, 256])
def test_a_plug_and_an_unplug_touch_one_slot_only(plugged: int) -> None:
    """At N plugged, plugging writes one free slot and unplugging disables one: every other slot stays as it was,
    bit for bit, and no tensor is reallocated."""
    storage = ExpertSlots(LAYERS, HIDDEN, torch.device("cpu"), torch.float32, capacity=plugged + 1, rank=4)
    for i in range(plugged):
        storage.plug(tiny_expert(f"e{i}", seed=i, threshold=0.0, rank=4 if i % 2 else 2))
    before = [t.clone() for t in _slot_tensors(storage)]
    addresses = [t.data_ptr() for t in _slot_tensors(storage)]
    new = tiny_expert("new", seed=999, threshold=0.1)
    storage.plug(new)
    slot = storage.slot_of("new")
    assert slot == plugged and storage.generation == 0
    after = _slot_tensors(storage)
    assert [t.data_ptr() for t in after] == addresses
    for other in range(storage.capacity):
        if other != slot:
            assert all(
                torch.equal(x, y) for x, y in zip(_column(before, other), _column(after, other), strict=False)
            ), other
    before = [t.clone() for t in after]
    storage.unplug("e3")
    after = _slot_tensors(storage)
    for other in range(storage.capacity):
        if other != 3:
            assert all(
                torch.equal(x, y) for x, y in zip(_column(before, other), _column(after, other), strict=False)
            ), other
    assert not storage.covers[:, 3].any() and bool(torch.isinf(storage.thresholds[:, 3]).all())
    assert storage.snapshot().columns[3] is None and "e3" not in storage.snapshot()


@pytest.mark.parametrize("plugged", [8, 256])
def test_a_lora_plug_touches_one_slot_only(plugged: int) -> None:
    """At N LoRA experts plugged, plugging another writes one slot of the LoRA storage and unplugging one writes
    none: every other slot's pairs stay as they were, bit for bit, and no tensor is reallocated."""
    model = RoutedModel(tiny_backbone("llama", seed=0))
    model.slots.reserve(plugged + 1)
    shapes = model.projection_shapes
    for i in range(plugged):
        model.plug(tiny_lora_expert(f"l{i}", shapes, seed=i, threshold=0.0, rank=4 if i % 2 else 2))
    lora = model.slots.weights["lora"]
    tensors = [*lora.a.values(), *lora.b.values(), *lora.s.values()]
    before, addresses = [t.clone() for t in tensors], [t.data_ptr() for t in tensors]
    plugged_set = model.plug(tiny_lora_expert("new", shapes, seed=999, threshold=0.1, rank=3))
    slot = plugged_set.index("new")
    assert slot == plugged and [t.data_ptr() for t in tensors] == addresses
    for old, new in zip(before, tensors, strict=True):
        keep = torch.ones(new.shape[1], dtype=torch.bool)
        keep[slot] = False
        assert torch.equal(old[:, keep], new[:, keep])
    before = [t.clone() for t in tensors]
    model.unplug("l3")
    assert all(torch.equal(old, new) for old, new in zip(before, tensors, strict=True))
    assert (
        not lora.is_lora[3]
        and model.plugged.layouts["lora"].pairs[0][3] is None
        and model.plugged.layouts["lora"].pairs[0][slot]
    )


def test_memory_is_one_copy_of_the_weights() -> None:
    """Per plugged expert the storage holds its weights once (at the storage's rank) and its gates."""
    model = RoutedModel(tiny_backbone("llama", seed=0))
    experts = [tiny_expert(f"e{i}", seed=i) for i in range(DEFAULT_CAPACITY)]
    model.plug(experts[0])  # the storage takes the rank of the first expert
    first = model.slots.nbytes()
    for expert in experts[1:]:
        model.plug(expert)
    assert model.slots.nbytes() == first, "slots are preallocated: plugging up to capacity allocates nothing"
    weights_per_slot = model.slots.weights["bottleneck"].nbytes() / model.slots.capacity
    assert weights_per_slot == experts[0].down.nbytes + experts[0].up.nbytes
    assert all(e.down.device.type == "meta" for e in model.plugged.experts)


def test_set_all_keeps_plugged_experts_in_their_slots_and_refuses_a_bad_set_whole() -> None:
    """An expert-set version at once: the kept expert (its handle) keeps its slot bit for bit, a replaced one is
    rewritten, one left out is disabled, a new one takes a slot; plug order follows the given order. A set that
    names an expert twice or holds an expert that does not fit changes nothing."""
    model = RoutedModel(tiny_backbone("llama", seed=0))
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        model.plug(tiny_expert(name, seed=seed, threshold=0.0))
    storage, plugged = model.slots, model.plugged
    kept = plugged.get("a")
    slot_a = plugged.index("a")
    before = [t.clone() for t in _column(_slot_tensors(storage), slot_a)]
    new_b, d = tiny_expert("b", seed=20, threshold=0.1), tiny_expert("d", seed=4, threshold=0.0)
    for bad, error in (
        ((kept, d, d), ExpertNameTakenError),
        ((kept, tiny_expert("x", hidden=HIDDEN * 2)), IncompatibleExpertError),
    ):
        with pytest.raises(error):
            model.set_experts(bad)
        assert model.plugged is plugged, "a refused set changes nothing"
    after = model.set_experts((d, kept, new_b))
    assert after.names == ("d", "a", "b") and after.get("a") is kept
    assert after.index("a") == slot_a
    assert all(torch.equal(x, y) for x, y in zip(before, _column(_slot_tensors(storage), slot_a), strict=True))
    assert "c" not in after and after.index("d") == plugged.index("c"), "c's slot, freed, is the lowest free one"
    torch.testing.assert_close(after.read("b").up, new_b.up)
    torch.testing.assert_close(after.read("d").down, d.down)


def test_lora_stacks_follow_the_lora_experts_by_slot() -> None:
    """A LoRA expert takes a slot for its gate (its bottleneck columns stay zero) and its pairs (the LoRA slot
    storage, the only copy); the set's LoRA stacks are views of that storage by slot, untouched by bottleneck
    plugs, and follow a LoRA expert that leaves and another that takes its slot."""
    model = RoutedModel(tiny_backbone("llama", seed=0))
    shapes = model.projection_shapes
    model.plug(tiny_expert("b", seed=1, threshold=0.0))
    a = tiny_lora_expert("a", shapes, seed=2, threshold=0.0)
    plugged = model.plug(a)
    slot = plugged.index("a")
    assert plugged.layouts["lora"].is_lora.tolist() == [i == slot for i in range(plugged.capacity)]
    assert (
        not plugged.layouts["bottleneck"].down[:, :, slot].any() and not plugged.layouts["bottleneck"].up[:, slot].any()
    )
    assert (
        plugged.layouts["bottleneck"].adapters[0][slot] is None
        and plugged.layouts["bottleneck"].adapters[0][plugged.index("b")] is not None
    )
    assert plugged.get("a").adapter.pairs["down_proj"].A.device.type == "meta", "the slot holds the only copy"
    back = plugged.read("a").adapter.pairs
    for p, pair in a.adapter.pairs.items():
        assert torch.equal(back[p].A, pair.A) and torch.equal(back[p].B, pair.B), p
        assert torch.equal(back[p].scaling, pair.scaling), p
    storage = model.slots.weights["lora"].a["down_proj"]
    before = storage.clone()
    after = model.plug(tiny_expert("c", seed=3))
    assert torch.equal(storage, before), "a bottleneck plug writes nothing of the LoRA slots"
    assert after.layouts["lora"].a[0]["down_proj"].data_ptr() == storage[0].data_ptr(), "views, not copies"
    model.unplug("a")
    assert model.plugged.layouts["lora"] is None
    c = tiny_lora_expert("z", shapes, seed=4, threshold=0.0)
    plugged = model.plug(c)
    assert plugged.index("z") == slot, "the freed slot is reused"
    torch.testing.assert_close(plugged.layouts["lora"].a[0]["down_proj"][slot].t(), c.adapter.pairs["down_proj"].A[0])
