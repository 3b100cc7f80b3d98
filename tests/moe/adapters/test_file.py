"""The expert file: round trip, and every way a file is refused (with nothing plugged changing)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from moe import Expert, RoutedModel
from moe.adapters.file import ExpertFile
from moe.errors import (
    BackboneMismatchError,
    InvalidMetadataError,
    MissingTensorError,
    NonFiniteTensorError,
    NotAnExpertFileError,
    TensorDtypeError,
    TensorShapeError,
    UnexpectedTensorError,
    UnreadableExpertFileError,
    UnsupportedExpertKindError,
    UnsupportedFormatVersionError,
)
from tests.tiny import tiny_backbone, tiny_expert


@pytest.fixture(scope="module")
def model() -> RoutedModel:
    return RoutedModel(tiny_backbone("gpt2"))


def make_expert(name: str = "math") -> Expert:
    return tiny_expert(
        name,
        up_scale=1.0,
        description="arithmetic",
        examples=("Question: 1 + 1?", "Question: 2 * 3?"),
        metadata={"provenance": {"steps": 10}, "evals": {"ppl": 1.5}},
    )


def test_round_trip(model: RoutedModel, tmp_path: Path) -> None:
    e = make_expert()
    path = ExpertFile.save(e, tmp_path / "math.safetensors", model.fingerprint)
    loaded = ExpertFile.load(path, model.fingerprint)
    assert (loaded.name, loaded.layers, loaded.description, loaded.examples) == (
        "math",
        (0, 1),
        "arithmetic",
        ("Question: 1 + 1?", "Question: 2 * 3?"),
    )
    for key, tensor in e.tensors().items():
        assert torch.equal(loaded.tensors()[key], tensor), key
    assert loaded.metadata["provenance"] == {"steps": 10} and loaded.metadata["evals"] == {"ppl": 1.5}
    assert loaded.metadata["backbone"] == model.fingerprint.to_dict()
    assert ExpertFile.load(path.read_bytes(), model.fingerprint, name="renamed").name == "renamed"
    assert not list(tmp_path.glob(".*.tmp")), "the atomic write leaves no temp file"


def _blob(model: RoutedModel, tensors: dict | None = None, **meta_changes) -> bytes:
    """A valid file's tensors and metadata with changes applied (None deletes a field)."""
    data = ExpertFile.to_bytes(make_expert(), model.fingerprint)
    metadata, _ = ExpertFile.read_header(data)
    from safetensors.torch import load

    loaded = load(data)
    if tensors:
        loaded.update(tensors)
        loaded = {k: v for k, v in loaded.items() if v is not None}
    for key, value in meta_changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    return save_safetensors(loaded, metadata=metadata)


def _other_fingerprint(model: RoutedModel) -> str:
    fp = model.fingerprint.to_dict()
    return json.dumps({**fp, "weights_hash": "0" * 16})


CASES = [
    ("empty", lambda m: b"", UnreadableExpertFileError, "too short"),
    ("garbage", lambda m: b"\xff" * 100, UnreadableExpertFileError, "bad header length"),
    ("bad json", lambda m: struct.pack("<Q", 4) + b"{{{{", UnreadableExpertFileError, "not valid JSON"),
    ("not ours", lambda m: save_safetensors({"w": torch.zeros(2)}), NotAnExpertFileError, "not a plugmoe expert"),
    ("version", lambda m: _blob(m, format_version="99"), UnsupportedFormatVersionError, "version '99'"),
    ("no name", lambda m: _blob(m, name=None), InvalidMetadataError, "lacks ['name']"),
    ("bad name", lambda m: _blob(m, name="Bad Name!"), InvalidMetadataError, "invalid"),
    ("reserved name", lambda m: _blob(m, name="base"), InvalidMetadataError, "reserved"),
    ("kind", lambda m: _blob(m, kind="ia3"), UnsupportedExpertKindError, "'ia3'"),
    ("bad layers", lambda m: _blob(m, layers="[0, 7]"), InvalidMetadataError, "below the backbone"),
    ("bad json meta", lambda m: _blob(m, layers="[0,"), InvalidMetadataError, "malformed"),
    ("fingerprint", lambda m: _blob(m, backbone=_other_fingerprint(m)), BackboneMismatchError, "weights_hash"),
    ("missing", lambda m: _blob(m, tensors={"keys": None}), MissingTensorError, "['keys']"),
    ("extra", lambda m: _blob(m, tensors={"bias": torch.zeros(3)}), UnexpectedTensorError, "['bias']"),
    ("shape", lambda m: _blob(m, tensors={"up": torch.zeros(2, 5, 32)}), TensorShapeError, "'up' has shape"),
    (
        "dtype",
        lambda m: _blob(m, tensors={"offsets": torch.zeros(2, dtype=torch.float64)}),
        TensorDtypeError,
        "'offsets'",
    ),
    (
        "mixed dtype",
        lambda m: _blob(m, tensors={"keys": torch.zeros(2, 32, dtype=torch.float16)}),
        TensorDtypeError,
        "share one of",
    ),
    ("nan", lambda m: _blob(m, tensors={"down": torch.full((2, 32, 4), float("nan"))}), NonFiniteTensorError, "'down'"),
]


@pytest.mark.parametrize(("case", "build", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_every_refusal_has_its_type_and_leaves_the_plugged_set(model, case, build, error, message) -> None:
    model.plug(make_expert("keep"), replace=True)
    before = model.plugged
    with pytest.raises(error, match=re.escape(message)):
        model.plug(ExpertFile.load(build(model), model.fingerprint))
    assert model.plugged is before, "a refused file changes nothing that was loaded"


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UnreadableExpertFileError, match="cannot read expert file"):
        ExpertFile.load(tmp_path / "nope.safetensors")


def test_bfloat16_file_loads(model: RoutedModel) -> None:
    e = make_expert()
    e.down, e.up, e.keys = e.down.bfloat16(), e.up.bfloat16(), e.keys.bfloat16()
    loaded = ExpertFile.load(ExpertFile.to_bytes(e, model.fingerprint), model.fingerprint)
    assert loaded.down.dtype == torch.bfloat16 and loaded.offsets.dtype == torch.float32


def test_fingerprint_is_dtype_independent_between_float32_and_bfloat16() -> None:
    from moe import fingerprint

    assert fingerprint(tiny_backbone("llama")) == fingerprint(tiny_backbone("llama").to(torch.bfloat16))
    assert fingerprint(tiny_backbone("llama")) != fingerprint(tiny_backbone("llama", seed=1))
