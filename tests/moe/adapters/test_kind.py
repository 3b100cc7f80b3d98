"""The adapter-kind protocol (moe.adapters.kind): every kind in the table provides the whole interface, round-trips
through the expert file, has its test oracle, and no module outside the kind modules asks which kind
an expert is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from moe import Expert, ExpertFile, RoutedModel, RoutingSpec
from moe.adapters.dispatch import KindLayout
from moe.adapters.kind import KINDS, Adapter, AdapterKind, KindSlots
from moe.adapters.reference import ORACLES, reference_forward
from moe.model import routed as routed_module
from moe.routing.router import RouterConfig
from tests.moe.adapters import gain_kind
from tests.tiny import HIDDEN, tiny_backbone, tiny_expert, tiny_lora_expert

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


# --- a new kind: one module (tests/moe/adapters/gain_kind.py) and one line in the table --------------------


@pytest.fixture
def gain(monkeypatch: pytest.MonkeyPatch) -> gain_kind.Gain:
    monkeypatch.setitem(KINDS, gain_kind.GAIN.name, gain_kind.GAIN)  # the table's one line
    monkeypatch.setitem(ORACLES, gain_kind.GAIN.name, gain_kind.oracle)  # its test oracle
    return gain_kind.GAIN


def gain_expert(name: str, seed: int, layers: tuple[int, ...] = (0, 1), threshold: float = 0.0) -> Expert:
    g = torch.Generator().manual_seed(seed)
    return Expert(
        name=name,
        layers=layers,
        adapter=gain_kind.GainAdapter(torch.randn(len(layers), HIDDEN, generator=g) * 0.5),
        **{**Expert.closed_gate(len(layers), HIDDEN, g), "thresholds": torch.full((len(layers),), threshold)},
    )


def test_a_new_kind_provides_the_protocol_and_round_trips_through_the_file(gain: gain_kind.Gain) -> None:
    model = RoutedModel(tiny_backbone("llama", seed=0))
    expert = gain_expert("g", seed=1)
    assert isinstance(gain, AdapterKind) and isinstance(expert.adapter, Adapter)
    loaded = ExpertFile.load(ExpertFile.to_bytes(expert, model.fingerprint), model.fingerprint)
    assert loaded.kind == "gain" and torch.equal(loaded.adapter.gain, expert.adapter.gain)
    model.plug(loaded)
    assert torch.equal(model.plugged.read("g").adapter.gain, expert.adapter.gain), "slot storage: one copy"
    assert model.plugged.get("g").adapter.gain.is_meta
    assert model.slots.eager_only and model.plugged.eager_only, "no fixed-op form: decode runs it eagerly"


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("path", ["gathered", "grouped"])
@torch.no_grad()
def test_a_new_kind_runs_beside_bottleneck_and_lora_experts_as_the_per_token_loop(
    gain: gain_kind.Gain, top_k: int, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing outside its module knows the gain kind, yet a batch mixing all three kinds (two run after the
    block: each sees its own experts' choices) equals the plain per-token loop, decisions included."""
    if path == "grouped":
        monkeypatch.setattr(routed_module, "GATHER_MAX_TOKENS", 0)
    model = RoutedModel(tiny_backbone("llama", seed=0), RouterConfig(top_k=top_k))
    shapes = model.projection_shapes
    experts = [
        tiny_expert("ba", seed=3, threshold=0.0),
        gain_expert("ga", seed=6, threshold=-0.05),
        tiny_lora_expert("la", shapes, seed=1, threshold=0.0, rank=3),
        gain_expert("gb", seed=7, layers=(1,), threshold=0.02),
        tiny_lora_expert("lb", shapes, seed=2, threshold=-0.02, layers=(1,), rank=2),
    ]
    for expert in experts:
        model.plug(expert)
    assert len(model.plugged.after_block) == 2 and len(model.plugged.in_block) == 1 and model.plugged.fixed is None
    x = torch.randint(1, 300, (3, 9), generator=torch.Generator().manual_seed(9))
    pins = {1: model.plugged.index("gb")}  # row 1 pinned to a gain expert that covers layer 1 only
    routing = [RoutingSpec(), RoutingSpec("pin", "gb"), RoutingSpec()]
    reference = model.plugged.replacing_all(tuple(experts))
    want, counts = reference_forward(tiny_backbone("llama", seed=0), reference, x, top_k, pins)
    out = model(x, routing=routing)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-4)
    assert out.trace.row_counts() == counts
    used = {name for row in counts for name, count in row.items() if count}
    assert used == {"ba", "ga", "la", "gb", "lb", "base"}, f"the case needs every route: {counts}"
