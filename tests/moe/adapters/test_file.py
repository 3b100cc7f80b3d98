"""The expert file (moe.adapters.file): round trip, and every way a file is refused (with nothing plugged changing).

From the hardening review (findings 4 and 7): every malformed header is a specific ExpertFileError (a 422, or 413
for what is over the size limits), never a TypeError or RecursionError (a 500, or a server that cannot start);
names must match the pattern whole (no trailing newline); weights are bounded in magnitude, not only finite."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from moe import Expert, InvalidExpertNameError, RoutedModel, check_name
from moe.adapters.file import MAX_ABS_WEIGHT, MAX_EXAMPLES, MAX_EXAMPLES_BYTES, MAX_HEADER_BYTES, ExpertFile
from moe.errors import (
    BackboneMismatchError,
    ExpertFileError,
    InvalidMetadataError,
    MetadataTooLargeError,
    MissingTensorError,
    NonFiniteTensorError,
    NotAnExpertFileError,
    TensorDtypeError,
    TensorShapeError,
    UnexpectedTensorError,
    UnreadableExpertFileError,
    UnsupportedExpertKindError,
    UnsupportedFormatVersionError,
    WeightMagnitudeError,
)
from moe.model.backbone import BackboneFingerprint
from tests.tiny import HIDDEN, VOCAB, tiny_backbone, tiny_expert


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


# --- malformed headers, names, limits and weight bounds (the hardening review) ---

FINGERPRINT = BackboneFingerprint("llama", HIDDEN, 2, VOCAB, "0" * 16)


def _expert(name: str = "math", scale: float = 1.0) -> Expert:
    return tiny_expert(name, up_scale=scale, examples=("Question: 1 + 1?",))


def _valid() -> bytes:
    return ExpertFile.to_bytes(_expert(), FINGERPRINT)


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: object, payload: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def _edit_header(change) -> bytes:
    header, payload = _split(_valid())
    change(header)
    return _join(header, payload)


def _edit_metadata(**fields) -> bytes:
    def change(header: dict) -> None:
        header["__metadata__"].update(fields)

    return _edit_header(change)


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def _set(key: str, value: object):
    return lambda header: header.__setitem__(key, value)


def _set_in(tensor: str, key: str, value: object):
    return lambda header: header[tensor].__setitem__(key, value)


HEADER_CASES = [
    # the review's cases
    ("__metadata__ is a string", _edit_header(_set("__metadata__", "x")), InvalidMetadataError, "__metadata__"),
    ("__metadata__ is a list", _edit_header(_set("__metadata__", ["a"])), InvalidMetadataError, "__metadata__"),
    ("metadata value not a string", _edit_metadata(rank=4), InvalidMetadataError, "string values"),
    ("a tensor entry is a string", _edit_header(_set("down", "x")), UnreadableExpertFileError, "'down'"),
    ('"shape": 5', _edit_header(_set_in("up", "shape", 5)), TensorShapeError, "shape 5"),
    ("shape of strings", _edit_header(_set_in("up", "shape", ["2", "4", "32"])), TensorShapeError, "list of sizes"),
    ("dtype a list", _edit_header(_set_in("keys", "dtype", ["F32"])), TensorDtypeError, "'keys'"),
    ('layers: "5"', _edit_metadata(layers="5"), InvalidMetadataError, "layer indices"),
    ("layers of strings", _edit_metadata(layers='["0", "1"]'), InvalidMetadataError, "layer indices"),
    ("layers of bools", _edit_metadata(layers="[true, false]"), InvalidMetadataError, "layer indices"),
    ("rank text", _edit_metadata(rank="four"), InvalidMetadataError, "rank"),
    ("rank float", _edit_metadata(rank="4.5"), InvalidMetadataError, "rank"),
    ("backbone a string", _edit_metadata(backbone='"llama"'), InvalidMetadataError, "backbone"),
    ("backbone fields", _edit_metadata(backbone='{"family": "llama"}'), InvalidMetadataError, "backbone"),
    (
        "backbone types",
        _edit_metadata(backbone=json.dumps({**FINGERPRINT.to_dict(), "hidden_size": "32"})),
        InvalidMetadataError,
        "backbone.hidden_size",
    ),
    ("provenance a list", _edit_metadata(provenance="[1]"), InvalidMetadataError, "provenance"),
    ("examples of numbers", _edit_metadata(examples="[1, 2]"), InvalidMetadataError, "examples"),
    ("lone surrogate", _edit_metadata(description="\ud800"), InvalidMetadataError, "description"),
    ("deeply nested header", _join(b"[" * 100_000 + b"]" * 100_000, b""), MetadataTooLargeError, "nests"),
    ("deeply nested metadata", _edit_metadata(evals="[" * 100_000 + "]" * 100_000), MetadataTooLargeError, "evals"),
    (
        "nested provenance",
        _edit_metadata(provenance=json.dumps({"a": _nested(20)})),
        MetadataTooLargeError,
        "provenance",
    ),
    # the metadata limits
    (
        "too many examples",
        _edit_metadata(examples=json.dumps(["x"] * (MAX_EXAMPLES + 1))),
        MetadataTooLargeError,
        f"{MAX_EXAMPLES + 1} strings",
    ),
    (
        "examples too long",
        _edit_metadata(examples=json.dumps(["y" * (MAX_EXAMPLES_BYTES + 1)])),
        MetadataTooLargeError,
        "examples",
    ),
    (
        "15 MB of examples (the review's)",
        _edit_metadata(examples=json.dumps(["z" * 1_000_000] * 15)),
        MetadataTooLargeError,
        "header",
    ),
    # names match whole: the review's "x\n" passed the old `match`
    ("name with a newline", _edit_metadata(name="x\n"), InvalidMetadataError, "invalid"),
]


@pytest.mark.parametrize(("case", "data", "error", "message"), HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_malformed_headers_are_specific_expert_file_errors(case: str, data: bytes, error: type, message: str) -> None:
    with pytest.raises(ExpertFileError) as raised:
        ExpertFile.load(data, FINGERPRINT)
    assert type(raised.value) is error, f"{type(raised.value).__name__}: {raised.value}"
    assert message in str(raised.value)


def test_a_header_over_the_limit_is_refused_before_it_is_parsed() -> None:
    data = struct.pack("<Q", MAX_HEADER_BYTES + 8) + b"{" + b" " * (MAX_HEADER_BYTES + 7)
    with pytest.raises(MetadataTooLargeError, match="header is"):
        ExpertFile.read_header(data)


def test_the_limits_themselves_are_allowed() -> None:
    examples = ["e" * (MAX_EXAMPLES_BYTES // MAX_EXAMPLES)] * MAX_EXAMPLES
    expert = ExpertFile.load(_edit_metadata(examples=json.dumps(examples)), FINGERPRINT)
    assert list(expert.examples) == examples


@pytest.mark.parametrize("name", ["x\n", "ok\n", "\nok", "a b", "A", "-a", "a" * 65, "base", ""])
def test_names_must_match_whole(name: str) -> None:
    with pytest.raises(InvalidExpertNameError):
        check_name(name)


def test_a_name_override_is_checked_whole() -> None:
    with pytest.raises(InvalidMetadataError, match="invalid"):
        ExpertFile.load(_valid(), FINGERPRINT, name="x\n")


@pytest.mark.parametrize(
    ("tensor", "value"),
    [("up", 3e38), ("down", -3e38), ("keys", MAX_ABS_WEIGHT * 2), ("offsets", 1e6), ("thresholds", -1e30)],
)
def test_finite_but_huge_weights_are_refused(tensor: str, value: float) -> None:
    """The review's expert with finite 3e38 weights was accepted and gave NaN logits when pinned."""
    tensors = load_safetensors(_valid())
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor].view(-1)[0] = value
    metadata, _ = ExpertFile.read_header(_valid())
    with pytest.raises(WeightMagnitudeError, match=f"'{tensor}'"):
        ExpertFile.load(save_safetensors(tensors, metadata=metadata), FINGERPRINT)


def test_weights_at_the_bound_load_and_are_finite_in_every_serving_dtype() -> None:
    expert = ExpertFile.load(ExpertFile.to_bytes(_expert(scale=0.0), FINGERPRINT), FINGERPRINT)
    expert.up = torch.full_like(expert.up, MAX_ABS_WEIGHT)
    loaded = ExpertFile.load(ExpertFile.to_bytes(expert, FINGERPRINT), FINGERPRINT)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.isfinite(loaded.to("cpu", dtype).up).all(), dtype


def test_the_writer_refuses_what_the_reader_would() -> None:
    with pytest.raises(MetadataTooLargeError, match="examples"):
        ExpertFile.to_bytes(tiny_expert("many", examples=tuple(["x"] * (MAX_EXAMPLES + 1))), FINGERPRINT)


# --- rank is memory (issue 24 item 4) -----------------------------------------------------------------------


def test_a_rank_over_the_cap_is_refused_before_any_tensor_is_read(model: RoutedModel) -> None:
    """The review's file: rank 4096 on one layer (8 MB) grew every slot to rank 4096 (+280 MB). The rank is
    checked against the cap from the metadata, before the tensors are read or checked."""
    from moe.adapters.file import MAX_RANK

    assert MAX_RANK == 256
    with pytest.raises(InvalidMetadataError, match=r"rank 4096, over the cap of 256 \(max_rank; the server's "):
        ExpertFile.load(_edit_metadata(rank="4096"), FINGERPRINT)
    high = ExpertFile.to_bytes(tiny_expert("wide", rank=300, layers=(0,)), model.fingerprint)
    with pytest.raises(InvalidMetadataError, match="--max-expert-rank"):
        ExpertFile.load(high, model.fingerprint)
    with pytest.raises(InvalidMetadataError, match="rank 300, over the cap of 64"):
        ExpertFile.load(high, model.fingerprint, max_rank=64)
    assert ExpertFile.load(high, model.fingerprint, max_rank=300).adapter.rank == 300


def test_a_lora_target_rank_over_the_cap_is_refused(model: RoutedModel) -> None:
    """LoRA: the metadata rank is the largest target rank (check_rank), so the cap bounds every target."""
    from tests.tiny import tiny_lora_expert

    lora = tiny_lora_expert("wide", model.projection_shapes, rank={"c_fc": 3, "c_proj": 40})
    data = ExpertFile.to_bytes(lora, model.fingerprint)
    with pytest.raises(InvalidMetadataError, match="rank 40, over the cap of 32"):
        ExpertFile.load(data, model.fingerprint, max_rank=32)
    assert ExpertFile.load(data, model.fingerprint, max_rank=40).name == "wide"
