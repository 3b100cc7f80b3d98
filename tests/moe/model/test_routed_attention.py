"""LoRA experts on attention projections (moe.model.routed.RoutedAttention): the decision before attention for
experts that adapt it, the MLP input for the others, one route per token per layer, against the token-by-token
merged-weights oracle (moe.adapters.reference.reference_decode) for every family, through prefill and decode."""

from __future__ import annotations

import pytest
import torch

from moe import RoutedModel, RoutingSpec
from moe.adapters.reference import reference_decode
from moe.decode.generation import generate
from moe.model import routed as routed_module
from moe.model.backbone import FAMILIES
from tests.tiny import FAMILIES as TINY_FAMILIES
from tests.tiny import MORE_FAMILIES, tiny_backbone, tiny_expert, tiny_lora_expert, tiny_tokenizer

ALL_FAMILIES = (*TINY_FAMILIES, *MORE_FAMILIES)


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def mixed_model(family: str, **kwargs) -> RoutedModel:
    """Three experts that each win some tokens (threshold 0 on random keys): an attention+MLP LoRA, an
    attention-only LoRA on layer 1, an MLP-only LoRA and a bottleneck expert."""
    model = RoutedModel(tiny_backbone(family, seed=0, **kwargs).double())
    shapes = model.target_shapes
    attention = list(FAMILIES[family].attention_targets)
    model.plug(tiny_lora_expert("all", shapes, seed=1, threshold=0.05, scale=0.3))
    model.plug(tiny_lora_expert("attn", shapes, seed=2, layers=(1,), targets=attention, threshold=0.0, scale=0.3))
    model.plug(tiny_lora_expert("mlp", model.projection_shapes, seed=3, threshold=0.0, scale=0.3))
    model.plug(tiny_expert("neck", seed=4, threshold=0.1))
    return model


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("length", [9, 30])  # 18 tokens: the gathered plan; 60: grouped
@torch.no_grad()
def test_token_routing_equals_the_token_by_token_oracle(family: str, length: int) -> None:
    model = mixed_model(family)
    x = ids(2, length)
    out = model(x)
    plain = tiny_backbone(family, seed=0).double()
    plugged = model.slots.snapshot()
    plugged = plugged.replacing_all(tuple(plugged.read(name) for name in plugged.names))
    names = [*plugged.names, "base"]
    routes = set()
    for row in range(2):
        want, choices = reference_decode(plain, plugged, x[row])
        torch.testing.assert_close(out.logits[row], want, atol=1e-6, rtol=1e-5)
        counts = dict.fromkeys(names, 0)
        for per_layer in choices:
            for e in per_layer:
                counts[names[e]] += 1
        assert out.trace.row_counts()[row] == pytest.approx(counts), row
        routes |= {names[e] for per_layer in choices for e in per_layer}
    assert {"all", "attn", "base"} <= routes and routes & {"mlp", "neck"}, f"the case needs both sites: {routes}"


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi3"])
@torch.no_grad()
def test_decode_keeps_each_tokens_routed_kv(family: str) -> None:
    """Greedy generation under token routing (prefill, then decode steps reading the cache) gives at every step
    the oracle's argmax on the same tokens: each token's K/V were cached as its own route produced them."""
    tokenizer = tiny_tokenizer()
    model = mixed_model(family, vocab=len(tokenizer))
    prompts = ["The quick brown fox", "def add(a, b):"]
    plain = tiny_backbone(family, seed=0, vocab=len(tokenizer)).double()
    plugged = model.slots.snapshot()
    plugged = plugged.replacing_all(tuple(plugged.read(name) for name in plugged.names))
    for g, prompt in zip(generate(model, tokenizer, prompts, RoutingSpec("token"), 8), prompts, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        fed = torch.tensor(prompt_ids + g.token_ids[:-1])
        logits, _ = reference_decode(plain, plugged, fed)
        assert logits[len(prompt_ids) - 1 :].argmax(dim=-1).tolist() == g.token_ids, prompt
        assert g.counts["all"] > 0 and g.counts["attn"] > 0 and g.counts["base"] > 0, g.counts


@torch.no_grad()
def test_a_pin_to_an_attention_expert_covers_both_blocks_and_a_pin_elsewhere_skips_the_early_step() -> None:
    model = mixed_model("llama")
    plain = tiny_backbone("llama", seed=0).double()
    plugged = model.slots.snapshot()
    plugged = plugged.replacing_all(tuple(plugged.read(name) for name in plugged.names))
    x = ids(1, 12)
    for name in ("all", "attn", "mlp", "neck"):
        out = model(x, routing=[RoutingSpec("pin", name)])
        want, choices = reference_decode(plain, plugged, x[0], pin=plugged.index(name))
        torch.testing.assert_close(out.logits[0], want, atol=1e-6, rtol=1e-5)
        covered = len(plugged.get(name).layers)
        assert out.trace.row_counts()[0][name] == 12 * covered, name


@torch.no_grad()
def test_without_an_attention_expert_the_attention_blocks_run_as_the_backbone_does() -> None:
    model = RoutedModel(tiny_backbone("gpt2", seed=0))
    model.plug(tiny_lora_expert("mlp", model.projection_shapes, seed=3, threshold=0.0))
    model.plug(tiny_expert("neck", seed=4, threshold=0.1))
    assert model.plugged.before_attention == ()
    x = ids(2, 9)
    before = model(x)
    model.plug(tiny_lora_expert("attn", model.target_shapes, seed=2, targets=["attn.c_attn"]))  # gate closed
    assert model.plugged.before_attention != ()
    after = model(x)
    # a closed early gate changes nothing (on CPU its layers plan grouped, not gathered: float rounding only)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-6, rtol=1e-5)
    for row in range(2):
        assert after.trace.row_counts()[row]["attn"] == 0
        assert {k: v for k, v in after.trace.row_counts()[row].items() if k != "attn"} == before.trace.row_counts()[row]


@torch.no_grad()
def test_capture_gives_the_attention_inputs_the_early_gates_read() -> None:
    model = RoutedModel(tiny_backbone("llama", seed=0))
    x = ids(2, 7)
    out = model(x, capture_attention_inputs=True, capture_mlp_inputs=True)
    assert len(out.attention_inputs) == len(out.mlp_inputs) == model.num_layers
    layer0 = model.backbone.model.layers[0]
    embedded = model.backbone.model.embed_tokens(x)
    torch.testing.assert_close(out.attention_inputs[0], layer0.input_layernorm(embedded))


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi3"])
@pytest.mark.parametrize("length", [9, 40])  # 36 tokens: few (decode-sized); 160: prefill-sized
@torch.no_grad()
def test_a_batch_of_pins_scores_no_gate_and_each_row_equals_its_pin_alone(
    family: str, length: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows pinned to different experts beside an off row (no row may win by score): the layers take each row's
    pin without scoring a gate (moe.model.routed._pinned_choice); every row is the oracle's with its pin. Then the
    whole batch on one expert (the LoRA plan's every-row form)."""
    model = mixed_model(family)
    plain = tiny_backbone(family, seed=0).double()
    plugged = model.slots.snapshot()
    plugged = plugged.replacing_all(tuple(plugged.read(name) for name in plugged.names))

    def no_scores(*args, **kwargs):
        raise AssertionError("a gate was scored in a batch of pins")

    monkeypatch.setattr(routed_module, "gate_scores", no_scores)
    for names in (["all", "attn", None, "neck"], ["all"] * 4):
        x = ids(4, length, seed=3)
        routing = [RoutingSpec("pin", name) if name else RoutingSpec("off") for name in names]
        out = model(x, routing=routing)
        for row, name in enumerate(names):
            pin = plugged.index(name) if name else None
            want = reference_decode(plain, plugged, x[row], pin=pin)[0] if name else plain(x[row : row + 1]).logits[0]
            torch.testing.assert_close(out.logits[row], want, atol=1e-6, rtol=1e-5)
            if name:
                assert out.trace.row_counts()[row][name] == length * len(plugged.get(name).layers), (names, row)
