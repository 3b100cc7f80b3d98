"""The plugged set: after every plug, replace and unplug, the whole state equals one built by a plain loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe import Expert, ExpertNameTakenError, IncompatibleExpertError, RoutedModel, UnknownExpertError
from moe.plugged import PluggedSet
from tests.tiny import HIDDEN, tiny_backbone, tiny_expert

LAYERS = 2


def assert_state(plugged: PluggedSet, experts: list[Expert], version: int) -> None:
    """Every field of `plugged` against the set `experts` (in plug order) spelled out layer by layer."""
    count = len(experts)
    assert plugged.names == tuple(e.name for e in experts) and len(plugged) == count
    assert plugged.version == version
    assert all(a is b for a, b in zip(plugged.experts, experts, strict=True))
    max_rank = max((e.rank for e in experts), default=0)
    assert plugged.keys.shape == (LAYERS, count, HIDDEN)
    assert plugged.offsets.shape == plugged.thresholds.shape == plugged.covers.shape == (LAYERS, count)
    assert plugged.down_stack.shape == (LAYERS, count, HIDDEN, max_rank)
    assert plugged.up_stack.shape == (LAYERS, count, max_rank, HIDDEN)
    assert len(plugged.adapters) == LAYERS and all(len(row) == count for row in plugged.adapters)
    for layer in range(LAYERS):
        for e, expert in enumerate(experts):
            if layer not in expert.layers:  # never eligible, nothing to run, nothing a pin may use
                assert not plugged.covers[layer, e]
                assert plugged.thresholds[layer, e] == float("inf") and plugged.offsets[layer, e] == 0
                assert not plugged.keys[layer, e].any()
                assert plugged.adapters[layer][e] is None
                assert not plugged.down_stack[layer, e].any() and not plugged.up_stack[layer, e].any()
                continue
            i = expert.layers.index(layer)
            assert plugged.covers[layer, e]
            torch.testing.assert_close(plugged.keys[layer, e], F.normalize(expert.keys[i], dim=0))
            assert plugged.offsets[layer, e] == expert.offsets[i]
            assert plugged.thresholds[layer, e] == expert.thresholds[i]
            adapter = plugged.adapters[layer][e]
            assert adapter.down.data_ptr() == expert.down[i].data_ptr(), "adapters reference the expert's tensors"
            assert adapter.up.data_ptr() == expert.up[i].data_ptr()
            # the stacks hold a zero-padded copy of each adapter
            assert torch.equal(plugged.down_stack[layer, e, :, : expert.rank], expert.down[i])
            assert torch.equal(plugged.up_stack[layer, e, : expert.rank], expert.up[i])
            assert not plugged.down_stack[layer, e, :, expert.rank :].any()
            assert not plugged.up_stack[layer, e, expert.rank :].any()


def empty() -> PluggedSet:
    return PluggedSet.empty(LAYERS, HIDDEN, torch.device("cpu"), torch.float32)


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


def test_lookups() -> None:
    a, b = tiny_expert("a", seed=1), tiny_expert("b", seed=2)
    state = empty().plugging(a).plugging(b)
    assert state.index("b") == 1 and state.get("a") is a
    assert "a" in state and "base" not in state and "zzz" not in state
    with pytest.raises(UnknownExpertError, match="plugged: none"):
        empty().get("a")


def test_plugged_set_state_after_each_plug_and_unplug() -> None:
    """Through the model: plug copies the expert to the model's device and dtype, then swaps the set whole."""
    model = RoutedModel(tiny_backbone("llama", seed=0))
    a = tiny_expert("a", seed=1, threshold=0.0)
    b = tiny_expert("b", seed=2, threshold=0.0, layers=(1,))
    c = tiny_expert("c", seed=3, threshold=0.0)
    model.plug(a)
    model.plug(b)
    model.plug(c)
    state = model.plugged
    assert_state(state, list(state.experts), 3)
    for mine, theirs in zip(state.experts, (a, b, c), strict=True):
        assert mine is not theirs and mine.name == theirs.name
        for key, tensor in theirs.tensors().items():
            assert torch.equal(mine.tensors()[key], tensor), key
    assert state.names == ("a", "b", "c") and state.version == 3
    assert state.covers.tolist() == [[True, False, True], [True, True, True]]
    assert state.thresholds[0, 1] == float("inf")
    assert state.adapters[0][1] is None and state.adapters[1][1] is not None
    model.unplug("b")
    assert model.plugged.names == ("a", "c") and model.plugged.covers.tolist() == [[True, True], [True, True]]
    assert_state(model.plugged, [state.experts[0], state.experts[2]], 4)
    assert state.names == ("a", "b", "c"), "an old snapshot never changes"
    with pytest.raises(ExpertNameTakenError, match="already plugged"):
        model.plug(tiny_expert("a", seed=9, threshold=0.0))
    new_a = tiny_expert("a", seed=9, threshold=0.0)
    model.plug(new_a, replace=True)
    assert model.plugged.names == ("a", "c")
    assert torch.equal(model.plugged.get("a").up, new_a.up)
    assert_state(model.plugged, list(model.plugged.experts), 5)
    with pytest.raises(UnknownExpertError, match="no expert named 'zzz'"):
        model.unplug("zzz")
    model.unplug("a")
    model.unplug("c")
    assert model.plugged.names == () and model.plugged.keys.shape == (2, 0, HIDDEN)
    assert_state(model.plugged, [], 7)
