"""The stages a snapshot resolves from its kinds' layouts (moe.adapters.dispatch): which kinds run inside the block,
which after it, and when the fixed-op decode path applies, for every mix of kinds a set can hold."""

from __future__ import annotations

import pytest
import torch

from moe import RoutedModel
from moe.adapters.dispatch import AfterBlock, InBlock
from tests.tiny import tiny_backbone, tiny_expert, tiny_lora_expert

# plugged kinds -> (in-block stages, after-block stages, fixed-op decode path)
CASES = {
    "nothing": ((), 0, 0, True),
    "bottleneck": (("bottleneck",), 0, 1, True),
    "lora": (("lora",), 1, 0, False),
    "both": (("bottleneck", "lora"), 1, 1, False),
}


def _plug(model: RoutedModel, kinds: tuple[str, ...]) -> None:
    for i, kind in enumerate(kinds):
        if kind == "bottleneck":
            model.plug(tiny_expert(f"b{i}", seed=i))
        else:
            model.plug(tiny_lora_expert(f"l{i}", model.projection_shapes, seed=i, layers=(1,)))


@pytest.mark.parametrize("case", list(CASES))
def test_stages_follow_the_kinds_plugged(case: str) -> None:
    kinds, in_block, after_block, fixed = CASES[case]
    model = RoutedModel(tiny_backbone("llama", seed=0))
    _plug(model, kinds)
    plugged = model.plugged
    assert len(plugged.in_block) == in_block and all(isinstance(s, InBlock) for s in plugged.in_block)
    assert len(plugged.after_block) == after_block and all(isinstance(s, AfterBlock) for s in plugged.after_block)
    assert (plugged.fixed is not None) == fixed
    assert plugged.eager_only == model.slots.eager_only == (not fixed)
    if in_block:
        assert plugged.in_block[0].on_layer == (False, True), "the LoRA covers layer 1 only"
    live = model.slots.live()  # what captured decode steps read: the fixed-op kinds only, whatever is plugged
    assert live.in_block == () and live.fixed is not None and len(live.after_block) == 1


def test_a_set_built_from_experts_has_no_fixed_op_path() -> None:
    """Training sets reference the experts' tensors: grouped dispatch only (gradients reach the leaves)."""
    model = RoutedModel(tiny_backbone("llama", seed=0))
    built = model.plugged.plugging(tiny_expert("b", seed=1))
    assert built.fixed is None and len(built.after_block) == 1 and built.in_block == ()


def test_unplugging_the_last_lora_expert_restores_the_fixed_op_path() -> None:
    model = RoutedModel(tiny_backbone("llama", seed=0))
    _plug(model, ("bottleneck", "lora"))
    assert model.plugged.fixed is None
    model.unplug("l1")
    assert model.plugged.fixed is not None and not model.slots.eager_only
    layer = 1
    down, up = model.plugged.fixed[layer]
    storage = model.slots.weights["bottleneck"]
    assert torch.equal(down, storage.down[layer]) and down.data_ptr() == storage.down[layer].data_ptr()
    assert up.data_ptr() == storage.up[layer].data_ptr()
