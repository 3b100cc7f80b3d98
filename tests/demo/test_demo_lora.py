"""The demo's imported PEFT LoRA experts (demo/compare/lora): valid for the built-in model, routed as the
README says, beside the bottleneck experts."""

from __future__ import annotations

import pytest

from demo import EXPERTS_DIR, MODEL_DIR
from experts.evaluate import sequence_decisions
from moe import ExpertFile, RoutedModel, load_backbone

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(), reason="demo model not built")

LORA_DIR = MODEL_DIR.parent / "compare" / "lora"
PROMPTS = {
    "math-lora": "Question: Tom has 5 apples and buys 3 more. How many apples does Tom have now?\nAnswer:",
    "code-lora": "def total_prices(prices):\n    total = 0\n    for price in prices:\n",
    "base": "Once upon a time, a curious fox walked along the river and met an old friend.",
}


@pytest.fixture(scope="module")
def model_and_tokenizer():
    backbone, tokenizer = load_backbone(MODEL_DIR, device="cpu")
    return RoutedModel(backbone), tokenizer


def test_imported_loras_route_their_domain_alone_and_beside_the_bottleneck_experts(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    for path in sorted(LORA_DIR.glob("*.safetensors")):
        expert = ExpertFile.load(path, model.fingerprint)
        assert expert.kind == "lora" and expert.metadata["provenance"]["source"] == "peft"
        model.plug(expert)
    assert model.plugged.names == ("code-lora", "math-lora")
    decided = sequence_decisions(model, tokenizer, list(PROMPTS.values()), model.plugged)
    assert decided == list(PROMPTS), "sequence mode: each prompt to its LoRA, the story to base"
    for path in sorted(EXPERTS_DIR.glob("*.safetensors")):
        model.plug(ExpertFile.load(path, model.fingerprint))
    decided = sequence_decisions(model, tokenizer, list(PROMPTS.values()), model.plugged)
    assert decided[2] == "base" and decided[0] in ("math", "math-lora") and decided[1] in ("code", "code-lora")
