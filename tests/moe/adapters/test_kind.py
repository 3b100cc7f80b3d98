"""The adapter-kind protocol (moe.adapters.kind): every kind in the table provides the whole interface, round-trips
through the expert file, has its test oracle, and no module outside the kind modules asks which kind
an expert is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from moe import Expert, ExpertFile, RoutedModel
from moe.adapters.dispatch import KindLayout
from moe.adapters.kind import KINDS, Adapter, AdapterKind, KindSlots
from moe.adapters.reference import ORACLES
from tests.tiny import tiny_backbone, tiny_expert, tiny_lora_expert

ROOT = Path(__file__).resolve().parents[3]
KIND_MODULES = {"moe/adapters/bottleneck.py", "moe/adapters/lora.py"}


def _expert(kind: str, model: RoutedModel) -> Expert:
    return {
        "bottleneck": lambda: tiny_expert("b", seed=1),
        "lora": lambda: tiny_lora_expert("l", model.projection_shapes, seed=2),
    }[kind]()


@pytest.fixture(scope="module")
def model() -> RoutedModel:
    return RoutedModel(tiny_backbone("llama", seed=0))


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_provides_the_protocol(name: str, model: RoutedModel) -> None:
    kind = KINDS[name]
    assert isinstance(kind, AdapterKind) and kind.name == name and kind.adapter.kind == name
    expert = _expert(name, model)
    assert isinstance(expert.adapter, kind.adapter) and isinstance(expert.adapter, Adapter)
    assert expert.kind == name and name in ORACLES, "a kind's oracle is in moe.adapters.reference"
    meta = expert.adapter.weightless()
    assert all(t.is_meta for t in meta.tensors().values())
    args = (model.num_layers, model.hidden_size, 2, model.device, model.dtype)
    # slot storage copies the weights (read from a weightless handle); references hold the expert's own (the handle)
    for storage, handle in ((kind.slots(*args[:3], 0, *args[3:]), meta), (kind.references(*args), expert.adapter)):
        assert isinstance(storage, KindSlots)
        storage.resize(2, kind.slot_rank(expert.adapter))  # what moe.adapters.slots does before a write
        storage.write(1, expert.layers, expert.adapter)
        layout = storage.layout([frozenset(), frozenset(expert.layers)], live=False)
        assert isinstance(layout, KindLayout) and (layout.in_block is None) != (layout.after_block is None)
        back = storage.read(1, expert.layers, handle)
        for key, tensor in expert.adapter.tensors().items():
            torch.testing.assert_close(back.tensors()[key], tensor.to(back.tensors()[key].dtype), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_round_trips_through_the_expert_file(name: str, model: RoutedModel) -> None:
    expert = _expert(name, model)
    data = ExpertFile.to_bytes(expert, model.fingerprint)
    loaded = ExpertFile.load(data, model.fingerprint)
    assert loaded.kind == name and type(loaded.adapter) is type(expert.adapter)
    assert loaded.tensors().keys() == expert.tensors().keys()
    for key, tensor in expert.tensors().items():
        assert torch.equal(loaded.tensors()[key], tensor.to(loaded.tensors()[key].dtype)), key
    again = ExpertFile.to_bytes(loaded, model.fingerprint)  # a loaded expert (its created time kept) writes the same
    assert ExpertFile.read_header(again) == ExpertFile.read_header(data)  # (safetensors orders metadata freely)


def _kind_branches(path: Path) -> list[str]:
    """isinstance checks against a kind's adapter class, and comparisons with a kind's name."""
    adapters = {kind.adapter.__name__ for kind in KINDS.values()}
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
            if names & adapters:
                found.append(f"{path}:{node.lineno} isinstance {sorted(names & adapters)}")
        if isinstance(node, ast.Compare):
            values = [node.left, *node.comparators]
            if any(isinstance(v, ast.Constant) and v.value in KINDS for v in values):
                found.append(f"{path}:{node.lineno} compares with a kind's name")
    return found


def test_no_kind_branches_outside_the_kind_modules() -> None:
    modules = [p for p in (ROOT / "moe").rglob("*.py") if str(p.relative_to(ROOT)) not in KIND_MODULES]
    assert len(modules) > 10
    assert [b for p in modules for b in _kind_branches(p)] == []
