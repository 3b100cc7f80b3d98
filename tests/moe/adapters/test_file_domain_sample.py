"""The expert file's optional `domain_sample`: round trip, bounds on save and on load, malformed metadata."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from moe import RoutedModel
from moe.adapters.file import DOMAIN_SAMPLE_MAX_BYTES, DOMAIN_SAMPLE_MAX_TEXTS, ExpertFile, bound_domain_sample
from moe.errors import DomainSampleError, ExpertFileError, InvalidMetadataError
from tests.tiny import tiny_backbone, tiny_expert


@pytest.fixture(scope="module")
def model() -> RoutedModel:
    return RoutedModel(tiny_backbone("gpt2"))


def _with_metadata(data: bytes, **changes: str) -> bytes:
    """The same file with some metadata fields replaced (what a hand-edited or foreign file could hold)."""
    metadata, _ = ExpertFile.read_header(data)
    return save_safetensors(load_safetensors(data), metadata={**metadata, **changes})


def test_round_trip_and_absent_sample(model: RoutedModel) -> None:
    sample = ["Question: 1 + 1?\nAnswer: 2", "def f():\n    return 'é'"]
    data = ExpertFile.to_bytes(tiny_expert("math", metadata={"domain_sample": sample}), model.fingerprint)
    assert ExpertFile.load(data, model.fingerprint).metadata["domain_sample"] == sample
    bare = ExpertFile.to_bytes(tiny_expert("math"), model.fingerprint)
    assert "domain_sample" not in ExpertFile.read_header(bare)[0]
    assert ExpertFile.load(bare, model.fingerprint).metadata["domain_sample"] == []


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("not json", "not valid JSON"),
        (json.dumps({"a": 1}), "JSON list of strings"),
        (json.dumps(["ok", 3]), "JSON list of strings"),
        (json.dumps(["x"] * (DOMAIN_SAMPLE_MAX_TEXTS + 1)), f"holds {DOMAIN_SAMPLE_MAX_TEXTS + 1} texts"),
        (json.dumps(["y" * (DOMAIN_SAMPLE_MAX_BYTES // 2 + 1)] * 2), "at most 64 texts and 65536 bytes"),
    ],
)
def test_a_bad_sample_is_refused_on_load(model: RoutedModel, value: str, needle: str) -> None:
    data = _with_metadata(ExpertFile.to_bytes(tiny_expert("math"), model.fingerprint), domain_sample=value)
    with pytest.raises(DomainSampleError, match=needle) as caught:
        ExpertFile.load(data, model.fingerprint)
    assert isinstance(caught.value, InvalidMetadataError | ExpertFileError)


def test_saving_an_oversized_sample_is_refused_and_bound_domain_sample_fits_any(model: RoutedModel) -> None:
    huge = ["z" * 5000] * 100
    with pytest.raises(DomainSampleError):
        ExpertFile.to_bytes(tiny_expert("math", metadata={"domain_sample": huge}), model.fingerprint)
    bounded = bound_domain_sample(["", *huge, "é" * 30_000])
    assert len(bounded) <= DOMAIN_SAMPLE_MAX_TEXTS and sum(len(t.encode()) for t in bounded) <= DOMAIN_SAMPLE_MAX_BYTES
    assert bounded[0] == "z" * 5000, "empty texts are skipped"
    cut = bound_domain_sample(["é" * 30_000])[0]
    assert len(cut.encode()) <= DOMAIN_SAMPLE_MAX_BYTES // 4 and set(cut) == {"é"}, "cut at a character boundary"
    data = ExpertFile.to_bytes(tiny_expert("math", metadata={"domain_sample": bounded}), model.fingerprint)
    assert ExpertFile.load(data, model.fingerprint).metadata["domain_sample"] == bounded
