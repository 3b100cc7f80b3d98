"""The expert file's LoRA kind: round trip, and every way a LoRA file is refused (nothing plugged changes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from moe import Expert, RoutedModel, RoutingSpec
from moe.adapters.file import ExpertFile
from moe.errors import (
    IncompatibleExpertError,
    InvalidMetadataError,
    MetadataTooLargeError,
    MissingTensorError,
    NonFiniteTensorError,
    TensorDtypeError,
    TensorShapeError,
    UnexpectedTensorError,
    WeightMagnitudeError,
)
from tests.tiny import tiny_backbone, tiny_expert, tiny_lora_expert


@pytest.fixture(scope="module")
def model() -> RoutedModel:
    return RoutedModel(tiny_backbone("gpt2"))  # c_fc 32 -> 128, c_proj 128 -> 32 (Conv1D)


def make_expert(model: RoutedModel, name: str = "code") -> Expert:
    expert = tiny_lora_expert(
        name, model.projection_shapes, seed=1, rank={"c_fc": 3, "c_proj": 5}, examples=("def f(x):",)
    )
    expert.description = "python"
    expert.metadata = {"provenance": {"source": "peft"}, "evals": {"gate": {"recall": [0.9]}}}
    return expert


def test_round_trip(model: RoutedModel, tmp_path: Path) -> None:
    e = make_expert(model)
    path = ExpertFile.save(e, tmp_path / "code.safetensors", model.fingerprint)
    metadata, infos = ExpertFile.read_header(path.read_bytes())
    assert metadata["kind"] == "lora" and metadata["rank"] == "5"
    assert json.loads(metadata["lora"]) == {
        "targets": {"c_fc": {"rank": 3, "in": 32, "out": 128}, "c_proj": {"rank": 5, "in": 128, "out": 32}}
    }
    assert infos["lora.c_fc.A"]["shape"] == [2, 3, 32] and infos["lora.c_proj.B"]["shape"] == [2, 32, 5]
    assert infos["lora.c_fc.scaling"]["dtype"] == "F32" and "down" not in infos
    loaded = ExpertFile.load(path, model.fingerprint)
    assert (loaded.kind, loaded.name, loaded.layers, loaded.examples) == ("lora", "code", (0, 1), ("def f(x):",))
    assert loaded.tensors().keys() == e.tensors().keys()
    for key, tensor in e.tensors().items():
        assert torch.equal(loaded.tensors()[key], tensor), key
    assert loaded.metadata["kind"] == "lora" and loaded.metadata["provenance"] == {"source": "peft"}
    model.plug(loaded)
    try:
        x = torch.randint(1, 300, (1, 6))
        assert not torch.allclose(model(x, routing=[RoutingSpec("pin", "code")]).logits, model(x).logits)
    finally:
        model.unplug("code")


def test_bfloat16_lora_file_keeps_float32_scalings(model: RoutedModel) -> None:
    e = make_expert(model).to("cpu", torch.bfloat16)
    loaded = ExpertFile.load(ExpertFile.to_bytes(e, model.fingerprint), model.fingerprint)
    pair = loaded.adapter.pairs["c_fc"]
    assert pair.A.dtype == pair.B.dtype == loaded.keys.dtype == torch.bfloat16
    assert pair.scaling.dtype == loaded.offsets.dtype == torch.float32


def _blob(model: RoutedModel, tensors: dict | None = None, **meta_changes) -> bytes:
    """A valid LoRA file's tensors and metadata with changes applied (None deletes)."""
    data = ExpertFile.to_bytes(make_expert(model), model.fingerprint)
    metadata, _ = ExpertFile.read_header(data)
    loaded = load_safetensors(data)
    for key, value in (tensors or {}).items():
        if value is None:
            loaded.pop(key)
        else:
            loaded[key] = value
    for key, value in meta_changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    return save_safetensors(loaded, metadata=metadata)


def _targets(**changes) -> str:
    targets = {"c_fc": {"rank": 3, "in": 32, "out": 128}, "c_proj": {"rank": 5, "in": 128, "out": 32}}
    targets.update(changes)
    return json.dumps({"targets": {k: v for k, v in targets.items() if v is not None}})


def _bottleneck_as_lora(model: RoutedModel) -> bytes:
    data = ExpertFile.to_bytes(tiny_expert("code"), model.fingerprint)
    metadata, _ = ExpertFile.read_header(data)
    return save_safetensors(load_safetensors(data), metadata={**metadata, "kind": "lora"})


CASES = [
    ("no lora metadata", lambda m: _blob(m, lora=None), InvalidMetadataError, "lacks 'lora'"),
    ("bottleneck relabelled", _bottleneck_as_lora, InvalidMetadataError, "lacks 'lora'"),
    ("malformed", lambda m: _blob(m, lora='{"targets": {"c_fc": {"rank": 3}}}'), InvalidMetadataError, "malformed"),
    ("no targets", lambda m: _blob(m, lora='{"targets": {}}'), InvalidMetadataError, "names no target"),
    (
        "not a projection",
        lambda m: _blob(m, lora=_targets(q_proj={"rank": 2, "in": 32, "out": 32})),
        InvalidMetadataError,
        "['q_proj'] are not MLP or attention projections",
    ),
    (
        "hidden side",
        lambda m: _blob(m, lora=_targets(c_proj={"rank": 5, "in": 128, "out": 48})),
        InvalidMetadataError,
        "does not fit a backbone of hidden size 32",
    ),
    ("rank", lambda m: _blob(m, rank="3"), InvalidMetadataError, "not the largest LoRA target rank"),
    (
        "missing",
        lambda m: _blob(m, {"lora.c_proj.scaling": None}),
        MissingTensorError,
        "['lora.c_proj.scaling']",
    ),
    ("extra", lambda m: _blob(m, {"down": torch.zeros(2, 32, 4)}), UnexpectedTensorError, "['down']"),
    (
        "shape",
        lambda m: _blob(m, {"lora.c_fc.A": torch.zeros(2, 3, 31)}),
        TensorShapeError,
        "'lora.c_fc.A' has shape [2, 3, 31], expected [2, 3, 32]",
    ),
    (
        "scaling dtype",
        lambda m: _blob(m, {"lora.c_fc.scaling": torch.ones(2, dtype=torch.float16)}),
        TensorDtypeError,
        "'lora.c_fc.scaling' has dtype 'F16', expected F32",
    ),
    (
        "mixed dtype",
        lambda m: _blob(m, {"lora.c_proj.B": torch.zeros(2, 32, 5, dtype=torch.bfloat16)}),
        TensorDtypeError,
        "the LoRA A and B tensors and keys must share",
    ),
    (
        "nan",
        lambda m: _blob(m, {"lora.c_proj.A": torch.full((2, 5, 128), float("nan"))}),
        NonFiniteTensorError,
        "'lora.c_proj.A'",
    ),
    # the file hardening's bound holds for every LoRA tensor: a B or a scaling past |w| <= 1e4 is refused
    (
        "huge B",
        lambda m: _blob(m, {"lora.c_fc.B": torch.full((2, 128, 3), 2e4)}),
        WeightMagnitudeError,
        "'lora.c_fc.B' holds values up to 2e+04",
    ),
    (
        "huge scaling",
        lambda m: _blob(m, {"lora.c_proj.scaling": torch.tensor([1.0, -3e4])}),
        WeightMagnitudeError,
        "'lora.c_proj.scaling' holds values up to 3e+04",
    ),
    (
        "size not an integer",
        lambda m: _blob(m, lora=_targets(c_fc={"rank": 3.0, "in": 32, "out": 128})),
        InvalidMetadataError,
        "target 'c_fc' is {'rank': 3.0",
    ),
    (
        "size a boolean",
        lambda m: _blob(m, lora=_targets(c_fc={"rank": True, "in": 32, "out": 128})),
        InvalidMetadataError,
        "target 'c_fc' is {'rank': True",
    ),
    ("targets not an object", lambda m: _blob(m, lora='{"targets": [1]}'), InvalidMetadataError, "malformed"),
    ("lora nests too deep", lambda m: _blob(m, lora="[" * 100_000), MetadataTooLargeError, "nests too deeply"),
]


@pytest.mark.parametrize(("case", "build", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_every_refusal_has_its_type_and_leaves_the_plugged_set(model, case, build, error, message) -> None:
    model.plug(make_expert(model, "keep"), replace=True)
    before = model.plugged
    with pytest.raises(error, match=re.escape(message)):
        model.plug(ExpertFile.load(build(model), model.fingerprint))
    assert model.plugged is before, "a refused file changes nothing that was loaded"


def test_a_valid_file_for_another_mlp_width_is_refused_at_plug(model: RoutedModel) -> None:
    """The fingerprint does not carry the MLP width: a file whose inner side differs passes file validation
    and is refused by the plugged set's check against the backbone's projections."""
    shapes = {"c_fc": (32, 96), "c_proj": (96, 32)}
    expert = ExpertFile.load(ExpertFile.to_bytes(tiny_lora_expert("wide", shapes), model.fingerprint))
    before = model.plugged
    with pytest.raises(IncompatibleExpertError, match="c_fc maps 32 -> 96, the backbone's c_fc maps 32 -> 128"):
        model.plug(expert)
    assert model.plugged is before
