"""Token mode by the context router's gates (PluggedSet.gates) in the routed forward: its decisions equal the plain
per-token reference (ContextRouter.token_routes on the captured inputs), prefill and the fixed-slot decoder agree
token by token, pins and allow-lists still bind, and a set without a router keeps the cosine gates."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe import RoutedModel
from moe.adapters.expert import BASE_ROUTE
from moe.admission.router_fit import ContextRouterFitter, capture_texts
from moe.decode.prefill import prefill
from moe.decode.static_decoder import StaticDecoder
from moe.model.text_batches import batches, forward, texts
from moe.routing.context import context_means
from moe.routing.router import RoutingSpec
from tests.moe.admission.test_router_fit import _texts
from tests.tiny import tiny_backbone, tiny_expert, tiny_lora_expert, tiny_tokenizer

NAMES = ("near", "far")


def _expert(name: str, seed: int, up_scale: float):
    return tiny_expert(
        name, seed=seed, threshold=-2.0, up_scale=up_scale, metadata={"domain_sample": _texts(name, 32, 0)}
    )


def _model(tokenizer, up_scale: float) -> RoutedModel:
    model = RoutedModel(tiny_backbone("llama", vocab=len(tokenizer)))
    experts = tuple(_expert(name, seed, up_scale) for seed, name in enumerate(NAMES, 1))
    model.set_experts(experts)
    ContextRouterFitter(model, tokenizer, calibration=_texts(BASE_ROUTE, 60, 0), cap=0.02).offer(experts)
    assert model.plugged.gates is not None
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def inert(tokenizer) -> RoutedModel:
    """Experts whose adapters change nothing (up = 0): every layer's inputs are the backbone's, as the reference
    reads them."""
    return _model(tokenizer, 0.0)


@pytest.fixture(scope="module")
def routed(tokenizer) -> RoutedModel:
    return _model(tokenizer, 0.5)


HELD = [*_texts("near", 4, 5), *_texts("far", 4, 5), *_texts(BASE_ROUTE, 4, 5)]


def test_token_decisions_equal_the_per_token_reference(inert, tokenizer) -> None:
    plugged = inert.plugged
    router = plugged.context
    (batch,) = batches(tokenizer, texts(HELD), 16, 64, eos=False)  # rows of different lengths, left-padded
    out = forward(inert, batch, [RoutingSpec()] * len(batch))
    for row, x in enumerate(capture_texts(inert, tokenizer, HELD)):
        classes = router.token_routes(x, router.skip)  # [T, L] class indices, 0 = base
        expected = {name: float((classes == c).sum()) for c, name in enumerate(router.classes)}
        counts = out.trace.row_counts()[row]
        assert {name: counts.get(name, 0.0) for name in router.classes} == expected, row
    shares = {name: 0.0 for name in router.classes}
    for counts in out.trace.row_counts():
        for name in shares:
            shares[name] += counts.get(name, 0.0)
    assert shares["near"] > 0 and shares["far"] > 0 and shares[BASE_ROUTE] > 0  # a real three-way split


def test_prefill_and_decode_agree_token_by_token(routed, tokenizer) -> None:
    """Greedy decode through the fixed-slot decoder (context sums in its buffer) counts exactly the decisions a
    single forward over prompt + generated tokens makes."""
    prompts = [tokenizer(t)["input_ids"] for t in HELD[::3]]
    specs = [RoutingSpec()] * len(prompts)
    pre = prefill(routed, prompts, specs)
    decoder = StaticDecoder(routed, max_batch=len(prompts), max_len=128)
    slots = [decoder.join(pre, row) for row in range(len(prompts))]
    totals = [dict(counts) for counts in pre.row_counts]
    generated = [[] for _ in prompts]
    logits = pre.logits
    for _ in range(6):
        tokens = logits.argmax(dim=-1).tolist()
        for row, token in enumerate(tokens):
            generated[row].append(token)
        step = decoder.step(slots, tokens, specs)
        for total, counts in zip(totals, step.row_counts, strict=True):
            for name, n in counts.items():
                total[name] = total.get(name, 0.0) + n
        logits = step.logits
    for row, prompt in enumerate(prompts):
        # the last generated token was fed too: the whole sequence is prompt + generated
        whole = prefill(routed, [prompt + generated[row]], [RoutingSpec()])
        assert whole.row_counts[0] == pytest.approx(totals[row]), row


def test_pins_allow_lists_and_off_still_bind(routed, tokenizer) -> None:
    ids = [tokenizer(HELD[0])["input_ids"]]
    n = len(ids[0]) * routed.num_layers
    assert prefill(routed, ids, [RoutingSpec("pin", "far")]).row_counts[0]["far"] == n
    assert prefill(routed, ids, [RoutingSpec("off")]).row_counts[0][BASE_ROUTE] == n
    allowed = prefill(routed, ids, [RoutingSpec(allow=("far",))]).row_counts[0]
    assert allowed.get("near", 0.0) == 0.0
    off = prefill(routed, ids, [RoutingSpec("off")])
    with torch.inference_mode():
        plain = routed.backbone(torch.tensor(ids), use_cache=True, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(off.logits, plain, rtol=0, atol=0)


def test_a_set_without_a_router_keeps_the_cosine_gates(tokenizer) -> None:
    model = RoutedModel(tiny_backbone("llama", vocab=len(tokenizer)))
    model.set_experts((_expert("near", 1, 0.5),))
    assert model.plugged.context is None and model.plugged.gates is None
    assert not model.plugged.eager_only


def _attention_set(tokenizer, threshold: float | None) -> RoutedModel:
    """Inert experts (their adapters change nothing, so the reference reads the backbone's inputs): bottleneck
    "near" and "far", and "other", a LoRA on attention and MLP projections whose gate is closed (None) or open to
    every token (-2), each with its own domain sample, under a fitted context router."""
    model = RoutedModel(tiny_backbone("llama", vocab=len(tokenizer)))
    other = tiny_lora_expert("other", model.target_shapes, seed=3, scale=0.0, threshold=threshold)
    other = dataclasses.replace(other, metadata={"domain_sample": _texts("other", 32, 0)})
    assert other.adapter.routes_before_attention
    experts = (*(_expert(name, seed, 0.0) for seed, name in enumerate(NAMES, 1)), other)
    for expert in experts:
        model.plug(expert)
    ContextRouterFitter(model, tokenizer, calibration=_texts(BASE_ROUTE, 60, 0), cap=0.02).offer(experts)
    assert model.plugged.gates is not None and model.plugged.before_attention
    return model


ATTENTION_HELD = [*HELD, *_texts("other", 4, 5)]


def test_an_expert_adapting_attention_takes_the_tokens_of_its_gates_and_the_router_decides_among_the_rest(
    tokenizer,
) -> None:
    """The decision for an expert that adapts attention is taken before attention, by its gates; at the MLP input
    the context router decides among the other classes (the attention expert's column closed, as the late
    allow-list has it): each bottleneck expert gets exactly the tokens that masked classifier gives it."""
    closed = _attention_set(tokenizer, None)
    router = closed.plugged.context
    assert router.classes == (BASE_ROUTE, *NAMES, "other")
    late = torch.tensor([c != "other" for c in router.classes])  # base and the MLP-site experts
    (batch,) = batches(tokenizer, texts(ATTENTION_HELD), 16, 64, eos=False)
    out = forward(closed, batch, [RoutingSpec()] * len(batch))
    moved = 0  # tokens the full classifier gives the attention expert, which go to the others' best instead
    for row, x in enumerate(capture_texts(closed, tokenizer, ATTENTION_HELD)):
        means = context_means(x, router.skip)  # [T, L, H]
        masked = torch.stack([gate.decide(means[:, layer], late) for layer, gate in enumerate(router.layers)], 1)
        masked[: router.skip] = 0
        counts = out.trace.row_counts()[row]
        for c, name in enumerate(NAMES, 1):
            assert counts.get(name, 0.0) == float((masked == c).sum()), (row, name)
        assert counts.get("other", 0.0) == 0.0  # its gate is closed
        assert counts[BASE_ROUTE] == float((masked == 0).sum()), row
        full = router.token_routes(x, router.skip)
        moved += int(((full == router.classes.index("other")) & (masked > 0)).sum())
    assert moved > 0  # the router does name the attention expert on some tokens: the case is exercised
    # its gate open to every token: the attention expert takes every token on the layers it covers, first
    opened = _attention_set(tokenizer, -2.0)
    out = forward(opened, batch, [RoutingSpec()] * len(batch))
    real = [len(tokenizer(t)["input_ids"]) for t in ATTENTION_HELD]
    for row, counts in enumerate(out.trace.row_counts()):
        assert counts["other"] == real[row] * 2, row  # layers (0, 1) of its file
