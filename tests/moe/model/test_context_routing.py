"""Token mode by the context router's gates (PluggedSet.gates) in the routed forward: its decisions equal the plain
per-token reference (ContextRouter.token_routes on the captured inputs), prefill and the fixed-slot decoder agree
token by token, pins and allow-lists still bind, a set without a router keeps the cosine gates, and a compiled decode
step over the gates in the slot storage's gate columns decides and decodes as the eager step, and does not recompile
when a set of the same form is published."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

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


def _one_token_step(model: RoutedModel, tokenizer, fixed_ops: bool, specs: list[RoutingSpec]):
    """Prefill HELD's rows (two of them free: token_mask 0), then one forward of one token per row on the running
    context sums (a decode step as the fixed-slot decoder runs it, on its CPU eager path or its fixed-op one)."""
    prompts = [tokenizer(t)["input_ids"] for t in HELD[:8]]
    pre = prefill(model, prompts, [RoutingSpec()] * len(prompts))
    context = torch.zeros(len(prompts), model.num_layers, model.hidden_size)
    for row in range(len(prompts)):
        whole = model(torch.tensor([prompts[row]]), routing=[RoutingSpec()])
        if whole.context is not None:
            context[row] = whole.context[0]
    mask = torch.ones(len(prompts), 1, dtype=torch.bool)
    mask[2] = mask[5] = False
    ids = pre.logits.argmax(dim=-1)[:, None]
    with torch.no_grad():
        out = model(ids, routing=specs, token_mask=mask, fixed_ops=fixed_ops, context=context)
    return out, context


@pytest.mark.parametrize("router", ["context", "gates"])
@pytest.mark.parametrize("rows", ["token", "rows"])
def test_a_step_counted_on_the_host_equals_one_counted_on_the_device(routed, tokenizer, router, rows) -> None:
    """An eager CPU step of one token per row reads each layer's choices and counts them on the host (`_host_trace`,
    with `ContextGates.step_read` for a batch in token mode): its trace per row and per layer, its running sums and its
    logits equal the fixed-op step's, which counts on the device (count_decisions), free rows and observe rows
    included; under the context router and under the cosine gates."""
    model = routed
    if router == "gates":
        model = RoutedModel(tiny_backbone("llama", vocab=len(tokenizer)))
        model.set_experts(tuple(_expert(name, seed, 0.5) for seed, name in enumerate(NAMES, 1)))
        assert model.plugged.gates is None
    specs = [RoutingSpec()] * 8 if rows == "token" else ROWS[:8]
    eager, eager_sums = _one_token_step(model, tokenizer, False, specs)
    fixed, fixed_sums = _one_token_step(model, tokenizer, True, specs)
    assert torch.equal(eager.trace.rows, fixed.trace.rows)
    assert torch.equal(eager.trace.layers, fixed.trace.layers)
    # the first layer's sums bit for bit (the same inputs; step_read's addcdiv_ against step's addcmul_); later
    # layers' inputs come through the first expert's matmuls, over the routed rows alone in the eager step and over
    # every row in the fixed-op one, and a CPU's GEMM may round those differently by row count (one ulp, seen)
    assert torch.equal(eager_sums[:, 0], fixed_sums[:, 0])
    torch.testing.assert_close(eager_sums, fixed_sums, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager.logits, fixed.logits)
    assert eager.trace.rows[[2, 5]].sum() == 0  # free rows count nothing
    counts = eager.trace.layers.sum(dim=0)
    assert counts[:2].sum() > 0  # experts took decisions
    assert router == "gates" or counts[-1] > 0  # and, by the router, base (the gates' thresholds open every token)


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


def _decode(
    model: RoutedModel,
    prompts: list[list[int]],
    specs: list[RoutingSpec],
    steps: int,
    decoder: StaticDecoder | None = None,
    **decoder_kw,
):
    """Greedy decode of every prompt at once through a fixed-slot decoder (a new one, max_batch: the prompts; or
    `decoder`, emptied first) -> (tokens per row, per step the rows' decision counts, the decoder)."""
    pre = prefill(model, prompts, specs)
    if decoder is None:
        decoder = StaticDecoder(model, max_batch=len(prompts), max_len=64, min_columns=64, **decoder_kw)
    decoder.reset()
    slots = [decoder.join(pre, row) for row in range(len(prompts))]
    tokens, counts = [[int(t)] for t in pre.logits.argmax(dim=-1)], []
    for _ in range(steps):
        out = decoder.step(slots, [row[-1] for row in tokens], specs)
        counts.append(out.row_counts)
        for row, token in zip(tokens, out.logits.argmax(dim=-1).tolist(), strict=True):
            row.append(token)
    return tokens, counts, decoder


# mixed prompts: each domain's text, plain token mode and, in a second case, per-row pins and allow-lists
MIXED = HELD[::2]
ROWS = [RoutingSpec(), RoutingSpec("pin", "far"), RoutingSpec(allow=("near",)), RoutingSpec("off")] * 2


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(
                    shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor's CPU backend needs g++"
                ),
            ],
        ),
    ],
)
@pytest.mark.parametrize("rows", ["token", "rows"])
def test_a_compiled_context_step_decides_and_decodes_as_the_eager_step(routed, tokenizer, backend, rows) -> None:
    """A set routed by its context router compiles (its gates are in the storage's gate columns, the rows' sums in
    the decoder's row storage): on mixed prompts every step's decisions per row and the greedy tokens equal the
    eager decoder's (which reads the host once per layer), and those equal the eager fixed-op step's."""
    assert routed.plugged.gates is not None and not routed.plugged.eager_only
    prompts = [tokenizer(t)["input_ids"] for t in MIXED]
    specs = [RoutingSpec()] * len(prompts) if rows == "token" else ROWS[: len(prompts)]
    eager = _decode(routed, prompts, specs, 8)
    fixed = _decode(routed, prompts, specs, 8, fixed_ops=True)
    torch._dynamo.reset()
    compiled = _decode(routed, prompts, specs, 8, compile_backend=backend)
    assert list(compiled[2]._compiled) == [(rows, routed.plugged.context_form)], "the steps ran compiled"
    assert compiled[0] == eager[0] == fixed[0]
    assert compiled[1] == eager[1] == fixed[1]
    routed_rows = {name for step in eager[1] for counts in step for name, n in counts.items() if n}
    assert {"near", "far", BASE_ROUTE} <= routed_rows  # every class takes decisions: a real mix


def test_a_published_set_of_the_same_form_does_not_recompile(tokenizer) -> None:
    """The gates are written into the gate columns in place on publish (fixed shapes), so a plug that leaves the
    step's shapes alone (a third expert, its slot free, the set and its refitted router published together, as the
    server swaps them) recompiles nothing while the form (floored, skip) stays; the steps after it decide and decode
    as a fresh eager decoder's on the new set."""
    model = _model(tokenizer, 0.5)
    form, columns = model.plugged.context_form, model.slots.context_gates.weight
    prompts = [tokenizer(t)["input_ids"] for t in (*MIXED[:2], *_texts("other", 2, 5))]
    specs = [RoutingSpec()] * len(prompts)
    torch._dynamo.reset()
    counters.clear()
    decoder = _decode(model, prompts, specs, 3, compile_backend="aot_eager")[2]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and len(decoder._compiled) == 1
    experts = (*(_expert(name, seed, 0.5) for seed, name in enumerate(NAMES, 1)), _expert("other", 3, 0.5))
    ContextRouterFitter(model, tokenizer, calibration=_texts(BASE_ROUTE, 60, 0), cap=0.02).offer(experts)
    model.set_experts(experts)  # published with its router (fitted first, as ServedExperts does)
    assert model.plugged.context.classes == (BASE_ROUTE, *NAMES, "other") and model.plugged.capacity == 8
    assert model.plugged.context_form == form, "the same form as the compiled step's"
    assert model.slots.context_gates.weight is columns, "the gate columns were written in place"
    compiled = _decode(model, prompts, specs, 6, decoder)
    assert counters["stats"]["unique_graphs"] == graphs and len(decoder._compiled) == 1, "nothing recompiled"
    eager = _decode(model, prompts, specs, 6)
    assert compiled[:2] == eager[:2]
    assert any(counts.get("other", 0.0) for step in eager[1] for counts in step), "the new expert takes decisions"
