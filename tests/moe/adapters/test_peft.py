"""moe.adapters.peft: a PEFT LoRA directory (or its two files' bytes) -> a pin-only LoRA expert. PEFT parity
per family, rank_pattern and the refusals live in tests/experts/test_import_lora.py (the command's tests, on
this same conversion); here: bytes and directory agree, the gate is closed (pinned: PEFT's logits; token
routing: the backbone's), attention targets served pinned (or dropped with mlp_only), lm_head refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from moe import RoutedModel, RoutingSpec
from moe.adapters.file import ExpertFile
from moe.adapters.peft import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoraImportError,
    NonMlpTargetsError,
    convert_adapter,
    convert_peft,
    parse_adapter,
)
from tests.tiny import tiny_backbone


def peft_dir(directory: Path, seed: int = 1, **config) -> Path:
    """A llama PEFT adapter with a nonzero lora_B (init_lora_weights=False), saved with save_pretrained."""
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ["up_proj", "down_proj"]}
    model = get_peft_model(tiny_backbone("llama", seed=0), LoraConfig(**{**options, **config}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(3.0)
    model.save_pretrained(directory)
    return directory


def ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_bytes_and_directory_give_one_pin_only_expert_with_peft_logits(tmp_path: Path) -> None:
    directory = peft_dir(tmp_path / "a", use_rslora=True)
    model = RoutedModel(tiny_backbone("llama", seed=0))
    from_dir, report = convert_adapter(directory, model, "a")
    config, tensors = parse_adapter(
        (directory / CONFIG_FILE).read_bytes(), (directory / WEIGHTS_FILE).read_bytes(), str(directory)
    )
    from_bytes, _ = convert_peft(config, tensors, model, "a", "/somewhere/a")
    assert report.targets == {"up_proj": 4, "down_proj": 4} and from_bytes.layers == (0, 1)
    for key, tensor in from_dir.adapter.tensors().items():
        assert torch.equal(tensor, from_bytes.adapter.tensors()[key]), key
    assert from_bytes.adapter.pairs["up_proj"].scaling.tolist() == [4.0, 4.0]  # rsLoRA: 8 / sqrt(4)
    assert from_bytes.metadata["provenance"]["adapter_dir"] == "/somewhere/a"
    assert (from_bytes.thresholds > 1.0 + from_bytes.offsets).all(), "gateless: no cosine passes a threshold"

    expert = ExpertFile.load(ExpertFile.to_bytes(from_bytes, model.fingerprint), model.fingerprint)
    model.plug(expert)
    x = ids(2, 12)
    want = PeftModel.from_pretrained(tiny_backbone("llama", seed=0), directory).eval()(x).logits
    torch.testing.assert_close(model(x, routing=[RoutingSpec("pin", "a")] * 2).logits, want, atol=1e-5, rtol=1e-4)
    plain = tiny_backbone("llama", seed=0)(x).logits
    assert not torch.allclose(want, plain, atol=1e-3), "vacuous: the adapter changes nothing"
    for mode in ("token", "sequence"):  # never wins a token unless pinned
        assert torch.equal(model(x, routing=[RoutingSpec(mode)] * 2).logits, plain), mode


@torch.no_grad()
def test_attention_targets_are_served_pinned_and_dropped_with_mlp_only(tmp_path: Path) -> None:
    directory = peft_dir(tmp_path / "attn", target_modules=["q_proj", "v_proj", "down_proj"])
    model = RoutedModel(tiny_backbone("llama", seed=0))
    expert, report = convert_adapter(directory, model, "attn")
    assert set(expert.adapter.pairs) == {"self_attn.q_proj", "self_attn.v_proj", "down_proj"} and not report.dropped
    model.plug(expert)
    x = ids(2, 12)
    want = PeftModel.from_pretrained(tiny_backbone("llama", seed=0), directory).eval()(x).logits
    torch.testing.assert_close(model(x, routing=[RoutingSpec("pin", "attn")] * 2).logits, want, atol=1e-5, rtol=1e-4)
    plain = tiny_backbone("llama", seed=0)(x).logits
    assert torch.equal(model(x).logits, plain), "gateless: decided before attention, it still wins nothing"

    expert, report = convert_adapter(directory, RoutedModel(tiny_backbone("llama", seed=0)), "attn", mlp_only=True)
    assert set(expert.adapter.pairs) == {"down_proj"} and len(report.dropped) == 4  # q, v on 2 layers


def test_modules_outside_the_projections_are_refused_naming_them(tmp_path: Path) -> None:
    directory = peft_dir(tmp_path / "head", target_modules=["lm_head", "down_proj"])
    with pytest.raises(NonMlpTargetsError, match=r"plugmoe does not serve: lm_head.*not embeddings, lm_head"):
        convert_adapter(directory, RoutedModel(tiny_backbone("llama", seed=0)), "head")


def test_unreadable_bytes_are_refused_with_the_file_named() -> None:
    with pytest.raises(LoraImportError, match=r"/x/adapter_config.json is not valid JSON"):
        parse_adapter(b"{not json", b"", "/x")
    with pytest.raises(LoraImportError, match=r"/x/adapter_model.safetensors cannot be read as safetensors"):
        parse_adapter(b'{"peft_type": "LORA"}', b"garbage", "/x")
