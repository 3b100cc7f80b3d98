"""Findings 4 and 7 of the hardening review, at the file format: every malformed header is a specific
ExpertFileError (a 422, or 413 for what is over the size limits), never a TypeError or RecursionError (a 500,
or a server that cannot start); names must match the pattern whole (no trailing newline); weights are
bounded in magnitude, not only finite."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from moe import Expert, ExpertFile, InvalidExpertNameError, check_name
from moe.adapters.file import MAX_ABS_WEIGHT, MAX_EXAMPLES, MAX_EXAMPLES_BYTES, MAX_HEADER_BYTES
from moe.errors import (
    ExpertFileError,
    InvalidMetadataError,
    MetadataTooLargeError,
    TensorDtypeError,
    TensorShapeError,
    UnreadableExpertFileError,
    WeightMagnitudeError,
)
from moe.model.backbone import BackboneFingerprint
from tests.tiny import HIDDEN, VOCAB, tiny_expert

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


CASES = [
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


@pytest.mark.parametrize(("case", "data", "error", "message"), CASES, ids=[c[0] for c in CASES])
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
