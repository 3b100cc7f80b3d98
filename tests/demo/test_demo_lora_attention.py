"""The demo's attention+MLP LoRA experts (demo/compare/lora-attention): they carry their attention pairs, route
their domain's prompts to themselves in sequence mode alone and beside the bottleneck experts, and the ceiling
file beside them is demo/experts/ceiling.json under the experts' names (what their eval.json's shares used)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from demo import EXPERTS_DIR, MODEL_DIR
from experts.evaluate import sequence_decisions
from moe import ExpertFile, RoutedModel, load_backbone

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(), reason="demo model not built")

ATTENTION_DIR = MODEL_DIR.parent / "compare" / "lora-attention"
ATTENTION_TARGETS = {f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
MLP_TARGETS = {"gate_proj", "up_proj", "down_proj"}
PROMPTS = {  # expert name -> a prompt of its domain (the bottleneck expert of the same domain in brackets)
    "math-attn-lora": "Question: Tom has 5 apples and buys 3 more. How many apples does Tom have now?\nAnswer:",
    "code-attn-lora": "def total_prices(prices):\n    total = 0\n    for price in prices:\n",
}
STORY = "Once upon a time, a curious fox walked along the river and met an old friend."


@pytest.fixture(scope="module")
def model_and_tokenizer():
    backbone, tokenizer = load_backbone(MODEL_DIR, device="cpu")
    return RoutedModel(backbone), tokenizer


def test_attention_loras_adapt_attention_and_route_their_domain(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    files = sorted(ATTENTION_DIR.glob("*.safetensors"))
    assert files, "no expert in demo/compare/lora-attention"
    for path in files:
        expert = ExpertFile.load(path, model.fingerprint)
        assert expert.kind == "lora" and expert.metadata["provenance"]["source"] == "peft"
        with safe_open(path, "pt") as tensors:
            keys = list(tensors.keys())  # noqa: SIM118 (a safe_open handle is not iterable)
        targets = {key.removeprefix("lora.").rsplit(".", 1)[0] for key in keys if key.startswith("lora.")}
        assert targets == ATTENTION_TARGETS | MLP_TARGETS, path.name
        model.plug(expert)
    names = model.plugged.names
    assert set(names) <= set(PROMPTS), f"a prompt per expert: {names}"
    prompts = [PROMPTS[name] for name in names] + [STORY]
    decided = sequence_decisions(model, tokenizer, prompts, model.plugged)
    assert decided == [*names, "base"], "sequence mode: each prompt to its LoRA, the story to base"
    for path in sorted(EXPERTS_DIR.glob("*.safetensors")):
        model.plug(ExpertFile.load(path, model.fingerprint))
    decided = sequence_decisions(model, tokenizer, prompts, model.plugged)
    assert decided[-1] == "base"
    for name, route in zip(names, decided, strict=False):
        domain = name.split("-")[0]
        assert route in (domain, name), f"{name}'s prompt went to {route}"


def test_the_ceiling_file_is_the_demo_ceilings_under_the_expert_names() -> None:
    ceilings = json.loads((EXPERTS_DIR / "ceiling.json").read_text())
    renamed = json.loads((ATTENTION_DIR / "ceiling.json").read_text())
    assert renamed == {f"{domain}-attn-lora": ceilings[domain] for domain in ("math", "code")}
