"""moe.model.llama_decode: a Llama backbone's eager CPU decode step written out equals transformers' forward over the
same slot cache bit for bit, routed or not, and runs only where it reproduces that forward."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe import RoutedModel, RoutingSpec
from moe.decode.prefill import prefill
from moe.decode.static_decoder import StaticDecoder, decode_one_token
from moe.model import routed as routed_module
from moe.model.backbone import FAMILIES
from tests.tiny import FAMILIES as TINY_FAMILIES
from tests.tiny import MORE_FAMILIES, tiny_config, tiny_expert, tiny_lora_expert

SPECS = [RoutingSpec("token"), RoutingSpec("off"), RoutingSpec("pin", "b"), RoutingSpec("token", allow=("a",))]


def _routed(seed: int = 0, family: str = "llama", **config: Any) -> RoutedModel:
    """A float32 tiny Llama (or another of the written-out families; GQA: 4 heads over 2 KV heads; `config` set on
    its config) with two bottleneck experts that win tokens."""
    torch.manual_seed(seed)
    llama = tiny_config(family)
    for name, value in config.items():
        setattr(llama, name, value)
    model = RoutedModel(AutoModelForCausalLM.from_config(llama).eval())
    model.plug(tiny_expert("a", seed=1, threshold=-1.0, up_scale=2.0))
    model.plug(tiny_expert("b", seed=2, threshold=0.0, up_scale=2.0))
    return model


def _count_written_out(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the steps RoutedModel runs written out (one entry per call)."""
    calls: list[int] = []
    inner = routed_module.llama_decode_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(routed_module, "llama_decode_forward", counted)
    return calls


@torch.no_grad()
def _decode(model: RoutedModel, steps: int, specs: list[RoutingSpec]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prefill 4 prompts of different lengths, then `steps` greedy decode steps of all rows -> logits per step
    [4, V] and each row's tokens."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 300, (length,), generator=g).tolist() for length in (5, 11, 3, 8)]
    decoder = StaticDecoder(model, max_batch=4, max_len=64, min_columns=8)
    pre = prefill(model, prompts, specs)
    slots = [decoder.join(pre, row) for row in range(len(prompts))]
    tokens = [[int(t)] for t in pre.logits.argmax(-1)]
    logits = []
    for _ in range(steps):
        out = decode_one_token(decoder, slots, [t[-1] for t in tokens], pre.specs)
        logits.append(out.logits)
        for row, token in enumerate(out.logits.argmax(-1).tolist()):
            tokens[row].append(token)
    return logits, tokens


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
VARIANTS = {
    "as configured": {},
    "qwen2 (q/k/v biases)": {"family": "qwen2"},
    "mistral, no sliding window": {"family": "mistral", "sliding_window": None},
    # biased projections, a head size that is not hidden / heads, Llama 3's scaled rotary angles
    "biases, head_dim, llama3 rope": {
        "attention_bias": True,
        "mlp_bias": True,
        "head_dim": 24,
        "rope_parameters": LLAMA3_ROPE,
    },
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_written_out_decode_step_equals_transformers_forward_bit_for_bit(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token, off, pinned and allow-listed rows in one batch, over KV columns that grow past two buckets: every
    step's logits equal those of transformers' forward exactly, and every decode step ran written out."""
    written, reference = _routed(**VARIANTS[variant]), _routed(**VARIANTS[variant])  # the same weights and experts
    reference._llama_decode = False
    calls = _count_written_out(monkeypatch)
    got, got_tokens = _decode(written, 30, SPECS)
    assert len(calls) == 30, "every decode step ran written out (prefill did not)"
    want, want_tokens = _decode(reference, 30, SPECS)
    assert len(calls) == 30, "the reference ran transformers' forward"
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), step
    assert got_tokens == want_tokens
    assert len({tuple(t) for t in got_tokens}) == 4, "the case needs distinct sequences"
    bare = _routed()
    bare.unplug("a"), bare.unplug("b")
    assert _decode(bare, 30, [RoutingSpec("off")] * 4)[1][0] != got_tokens[0], "routing changes the token row"


def test_a_step_routing_an_attention_expert_runs_transformers_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """An expert that adapts attention is decided at the attention block's input (RoutedAttention): while one is
    plugged, routed steps take transformers' forward; routing off still runs written out."""
    model = _routed()
    attention = list(FAMILIES["llama"].attention_targets)
    model.plug(tiny_lora_expert("attn", model.target_shapes, seed=3, targets=attention, threshold=0.0, scale=0.3))
    assert model.plugged.before_attention != ()
    calls = _count_written_out(monkeypatch)
    _decode(model, 3, [RoutingSpec("token")] * 4)
    assert calls == []
    _decode(model, 3, [RoutingSpec("off")] * 4)
    assert len(calls) == 3


@pytest.mark.parametrize("family", TINY_FAMILIES + MORE_FAMILIES)
def test_only_llama_family_backbones_are_written_out(family: str) -> None:
    """llama, qwen2 and mistral without a sliding window; not Qwen3 (q/k norms), Gemma (its own norm and embedding
    scale), Phi-3 (fused projections), OLMo, SmolLM3 (layers without rope), nor GPT-2 or GPT-NeoX."""
    config = tiny_config(family)
    if family == "mistral":
        config.sliding_window = None
    torch.manual_seed(0)
    model = RoutedModel(AutoModelForCausalLM.from_config(config).eval())
    assert model._llama_decode == (family in ("llama", "qwen2", "mistral"))


def test_a_sliding_window_runs_transformers_forward() -> None:
    """Mistral's window (4096 by default) and Qwen2's when it is used: the written-out attention has none."""
    mistral = tiny_config("mistral")
    assert mistral.sliding_window is not None
    assert not RoutedModel(AutoModelForCausalLM.from_config(mistral).eval())._llama_decode
    qwen2 = tiny_config("qwen2")
    qwen2.use_sliding_window, qwen2.sliding_window, qwen2.max_window_layers = True, 16, 0
    qwen2.layer_types = ["sliding_attention"] * qwen2.num_hidden_layers
    assert not RoutedModel(AutoModelForCausalLM.from_config(qwen2).eval())._llama_decode
