"""The fixed-slot decoder (static_decoder.StaticDecoder): rows joining and leaving at any step decode exactly as
each sequence alone through transformers' DynamicCache (bare, every family) and through the routed model (token,
pin, allow-list and off rows), base-route rows stay bit-exact, a step reads no value on the host, routing rows
follow plugs and unplugs (no allow-list or pin is inherited by a reused slot), buckets and columns follow the
live rows, and a compiled step equals the eager one.

Correctness runs in float64 on tiny models with large weights, so greedy near-ties cannot flip a token."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, DynamicCache

from moe import Expert, RoutedModel, RoutingSpec, UnknownExpertError
from moe.decode import static_decoder
from moe.decode.generation import generate
from moe.decode.prefill import prefill
from moe.decode.static_decoder import StaticDecoder, capture_refusal, decode_one_token
from moe.model.kv_cache import cache_kwarg
from tests.tiny import FAMILIES, tiny_config, tiny_expert, tiny_lora_expert, tiny_tokenizer

# (arrival step, prompt length, new tokens): rows arrive while others run, leave early or late, and reuse slots
SCHEDULE = [(0, 5, 40), (0, 3, 7), (2, 9, 25), (4, 4, 38), (12, 14, 12), (20, 6, 9)]


def tiny64(family: str, seed: int = 0) -> torch.nn.Module:
    config = tiny_config(family)
    config.initializer_range = 0.2  # the default 0.02 makes a tiny model repeat one token forever: a weak test
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval().double()


def prompts_of(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 380, (length,), generator=g).tolist() for _, length, _ in SCHEDULE]


@torch.inference_mode()
def alone(model: torch.nn.Module | RoutedModel, prompt: list[int], steps: int, spec: RoutingSpec | None = None):
    """Greedy decode of one sequence with a DynamicCache: (tokens, logits per step). model: a plain HF model
    (spec None) or a RoutedModel."""
    cache = DynamicCache()
    if isinstance(model, RoutedModel):
        call = lambda x: model(x, routing=[spec], past_key_values=cache, use_cache=True).logits  # noqa: E731
    else:
        kw = cache_kwarg(model)
        call = lambda x: model(input_ids=x, use_cache=True, **{kw: cache}).logits  # noqa: E731
    logits = [call(torch.tensor([prompt]))[0, -1]]
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps - 1):
        logits.append(call(torch.tensor([[tokens[-1]]]))[0, -1])
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


def run_schedule(decoder: StaticDecoder, model: RoutedModel, prompts, specs, between=None):
    """Continuous batching over SCHEDULE: rows join free slots when they arrive (prefilled together) and leave
    when done; greedy. between(step, decoder, live) may act between steps and return new specs per request.
    Returns (tokens, logits) per request."""
    waiting = list(range(len(SCHEDULE)))
    live: dict[int, int] = {}  # slot -> request
    tokens: dict[int, list[int]] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    step = 0
    while waiting or live:
        if between is not None:
            specs = between(step, decoder, live) or specs
        arrived = [i for i in waiting if SCHEDULE[i][0] <= step][: decoder.free]
        if arrived:
            pre = prefill(model, [prompts[i] for i in arrived], [specs[i] for i in arrived])
            for row, i in enumerate(arrived):
                waiting.remove(i)
                specs[i] = pre.specs[row]
                logits[i], tokens[i] = [pre.logits[row]], [int(pre.logits[row].argmax())]
                live[decoder.join(pre, row)] = i
        for slot, i in list(live.items()):
            if len(tokens[i]) >= SCHEDULE[i][2]:
                decoder.leave(slot)
                del live[slot]
        if live:
            slots = list(live)
            out = decode_one_token(
                decoder, slots, [tokens[live[s]][-1] for s in slots], [specs[live[s]] for s in slots]
            )
            for row, slot in enumerate(slots):
                logits[live[slot]].append(out.logits[row])
                tokens[live[slot]].append(int(out.logits[row].argmax()))
        step += 1
    return tokens, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_bare_decode_equals_dynamic_cache_alone(family: str) -> None:
    """Rows join (several prefilled together), leave, and reuse slots; row buckets shrink and grow, and the KV
    columns grow from 8 as rows get longer: every token equals the plain HF model decoding each prompt alone."""
    plain = tiny64(family)
    model = RoutedModel(copy.deepcopy(plain))
    prompts = prompts_of(len(family))
    want = [alone(plain, p, steps) for p, (_, _, steps) in zip(prompts, SCHEDULE, strict=True)]
    decoder = StaticDecoder(model, max_batch=4, max_len=64, min_columns=8)
    tokens, logits = run_schedule(decoder, model, prompts, [RoutingSpec("off")] * len(SCHEDULE))
    assert decoder.columns == 64 and decoder.live == []
    for i, (want_tokens, want_logits) in enumerate(want):
        assert tokens[i] == want_tokens, i
        torch.testing.assert_close(torch.stack(logits[i]), torch.stack(want_logits), atol=1e-9, rtol=1e-9)
    assert len({tuple(t) for t in tokens.values()}) == len(SCHEDULE), "the case needs distinct sequences"


def experts_for(model: RoutedModel, count: int, seed: int) -> list[Expert]:
    """Always-eligible experts of mixed ranks that change the output; every third covers only the last layer."""
    layers, out = model.num_layers, []
    for i in range(count):
        covered = range(layers) if i % 3 else (layers - 1,)
        out.append(
            tiny_expert(f"e{i}", seed=seed + i, layers=covered, rank=4 + 4 * (i % 2), threshold=-1.0, up_scale=2.0)
        )
    return out


ROUTINGS = [
    RoutingSpec("token"),
    RoutingSpec("pin", "e1"),
    RoutingSpec("token", allow=("e0", "e2")),
    RoutingSpec("off"),
    RoutingSpec("sequence"),
    RoutingSpec("pin", "e3"),
]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_routed_decode_equals_the_routed_model_alone(family: str) -> None:
    """Token, pinned (also on a layer the expert skips), allow-list, off and sequence rows together, joining
    and leaving: each equals the routed model decoding it alone with a DynamicCache (the grouped path), and
    routing changes what most of them generate."""
    model = RoutedModel(tiny64(family, seed=3))
    reference = RoutedModel(tiny64(family, seed=3))
    for expert in experts_for(model, 4, seed=5):
        model.plug(expert)
        reference.plug(expert)
    prompts = prompts_of(11)
    specs = list(ROUTINGS)
    decided = prefill(reference, prompts, specs).specs  # the sequence row's decision, made the same way
    want = [alone(reference, p, steps, s) for p, (_, _, steps), s in zip(prompts, SCHEDULE, decided, strict=True)]
    bare = [alone(reference.backbone, p, steps)[0] for p, (_, _, steps) in zip(prompts, SCHEDULE, strict=True)]
    decoder = StaticDecoder(model, max_batch=4, max_len=64, min_columns=16)
    tokens, logits = run_schedule(decoder, model, prompts, specs)
    for i, (want_tokens, want_logits) in enumerate(want):
        assert tokens[i] == want_tokens, (i, ROUTINGS[i])
        torch.testing.assert_close(torch.stack(logits[i]), torch.stack(want_logits), atol=1e-9, rtol=1e-9)
    assert sum(tokens[i] != bare[i] for i in range(len(SCHEDULE))) >= 4, "routing must change what is generated"
    assert tokens[3] == bare[3], "the off row is the backbone's"


LORA_ROUTINGS = [
    RoutingSpec("token"),
    RoutingSpec("pin", "l0"),
    RoutingSpec("token", allow=("e0", "l1")),
    RoutingSpec("off"),
    RoutingSpec("sequence"),
    RoutingSpec("pin", "e1"),
]


def mixed_experts(model: RoutedModel, seed: int) -> list[Expert]:
    """Two bottleneck experts (experts_for) and two always-eligible LoRA experts, one on the last layer only."""
    shapes, last = model.projection_shapes, model.num_layers - 1
    loras = [
        tiny_lora_expert(f"l{i}", shapes, seed=seed + 10 + i, layers=layers, threshold=-1.0, offset=0.05 * i)
        for i, layers in enumerate([range(model.num_layers), (last,)])
    ]
    return [*experts_for(model, 2, seed=seed), *loras]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decode_with_lora_experts_plugged_runs_eagerly_and_equals_the_routed_model_alone(family: str) -> None:
    """LoRA experts plugged beside bottleneck ones: the decoder's steps run the eager grouped path (no compiled
    or captured step runs a LoRA), and every row equals the routed model decoding it alone (DynamicCache), whose
    LoRA dispatch tests/moe/test_lora.py checks against the per-token reference loop."""
    model = RoutedModel(tiny64(family, seed=3))
    reference = RoutedModel(tiny64(family, seed=3))
    for expert in mixed_experts(model, seed=5):
        model.plug(expert)
        reference.plug(expert)
    assert model.plugged.eager_only
    prompts = prompts_of(13)
    specs = list(LORA_ROUTINGS)
    decided = prefill(reference, prompts, specs).specs
    want = [alone(reference, p, steps, s) for p, (_, _, steps), s in zip(prompts, SCHEDULE, decided, strict=True)]
    bare = [alone(reference.backbone, p, steps)[0] for p, (_, _, steps) in zip(prompts, SCHEDULE, strict=True)]
    decoder = StaticDecoder(model, max_batch=4, max_len=64, min_columns=16, compile_backend="aot_eager")
    tokens, logits = run_schedule(decoder, model, prompts, specs)
    assert decoder._compiled == {}, "no compiled step while a LoRA expert is plugged"
    for i, (want_tokens, want_logits) in enumerate(want):
        assert tokens[i] == want_tokens, (i, LORA_ROUTINGS[i])
        torch.testing.assert_close(torch.stack(logits[i]), torch.stack(want_logits), atol=1e-9, rtol=1e-9)
    assert tokens[1] != bare[1], "the LoRA pin changes what is generated"
    assert tokens[3] == bare[3], "the off row is the backbone's"


def test_unplugging_the_last_lora_expert_brings_back_the_compiled_step() -> None:
    """A LoRA expert plugged between steps moves the decoder to eager steps at once, and unplugging it brings
    back the compiled step; the tokens equal an eager decoder's under the same plugs throughout."""
    results = []
    for backend in (None, "aot_eager"):
        model = RoutedModel(tiny64("llama", seed=1).float())
        for expert in experts_for(model, 2, seed=3):
            model.plug(expert)
        lora = tiny_lora_expert("l0", model.projection_shapes, seed=7, threshold=-1.0, offset=1.0)
        decoder = StaticDecoder(model, max_batch=2, max_len=32, min_columns=32, compile_backend=backend)
        specs = [RoutingSpec("token"), RoutingSpec("token")]
        pre = prefill(model, [[5, 6, 7], [9, 10, 11, 12]], specs)
        rows = [(decoder.join(pre, i), int(pre.logits[i].argmax())) for i in range(2)]
        tokens, compiled = [], []
        for t in range(9):
            if t == 3:
                model.plug(lora)
            if t == 6:
                model.unplug("l0")
            out = decode_one_token(decoder, [r[0] for r in rows], [r[1] for r in rows], specs)
            rows = [(slot, int(x)) for (slot, _), x in zip(rows, out.logits.argmax(-1), strict=True)]
            tokens.append([r[1] for r in rows])
            compiled.append(len(decoder._compiled))
            if 3 <= t < 6:
                assert out.row_counts[0]["l0"] > 0, "the LoRA expert takes tokens while plugged"
        results.append((tokens, compiled))
    (eager_tokens, eager_compiled), (tokens, compiled) = results
    assert eager_compiled == [0] * 9
    assert compiled == [1, 1, 1, 1, 1, 1, 1, 1, 1], "one compiled bucket, reused after the LoRA expert left"
    assert tokens == eager_tokens


def test_base_route_rows_are_bit_exact_and_the_trace_counts_each_row() -> None:
    """In one routed step, an off row's logits equal, bit for bit, the same row in a step where nothing routes;
    the step's counts per row match the routed model's on the same token."""
    model = RoutedModel(tiny64("llama", seed=2))
    for expert in experts_for(model, 3, seed=7):
        model.plug(expert)
    prompts = prompts_of(3)[:4]
    routed_specs = [RoutingSpec("token"), RoutingSpec("off"), RoutingSpec("pin", "e0"), RoutingSpec(allow=("e1",))]
    steps = {}
    for name, specs in (("routed", routed_specs), ("bare", [RoutingSpec("off")] * 4)):
        decoder = StaticDecoder(model, max_batch=4, max_len=32)
        pre = prefill(model, prompts, specs)
        slots = [decoder.join(pre, row) for row in range(4)]
        first = [int(t) for t in pre.logits.argmax(-1)]
        steps[name] = (decode_one_token(decoder, slots, first, specs), first)
    (routed, first), (bare, _) = steps["routed"], steps["bare"]
    assert torch.equal(routed.logits[1], bare.logits[1]), "the base route is the backbone, bit for bit"
    assert not torch.equal(routed.logits[0], bare.logits[0])
    for row, (prompt, spec) in enumerate(zip(prompts, routed_specs, strict=True)):
        cache = DynamicCache()
        with torch.inference_mode():
            model(torch.tensor([prompt]), routing=[spec], past_key_values=cache, use_cache=True)
            out = model(torch.tensor([[first[row]]]), routing=[spec], past_key_values=cache, use_cache=True)
        assert routed.row_counts[row] == out.trace.row_counts()[0], row
        torch.testing.assert_close(routed.logits[row], out.logits[0, -1], atol=1e-9, rtol=1e-9)
    layers = model.num_layers
    assert routed.row_counts[1] == {"e0": 0, "e1": 0, "e2": 0, "base": layers}
    assert routed.row_counts[2] == {"e0": 1, "e1": 0, "e2": 0, "base": layers - 1}, "e0 covers the last layer only"
    totals = {name: sum(c[name] for c in routed.layer_counts) for name in ("e0", "e1", "e2", "base")}
    assert (
        totals == {name: sum(c[name] for c in routed.row_counts) for name in totals}
        and len(routed.layer_counts) == layers
    )


class HostReads(TorchDispatchMode):
    """Records ops that read a device value on the host or whose output shape depends on values."""

    READS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique_consecutive", "_unique2", "bincount"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))

    @property
    def reads(self) -> list[str]:
        return [op for op in self.ops if op in self.READS]


def test_a_step_reads_nothing_on_the_host() -> None:
    """The body a CUDA graph would capture (routed: pins, allow-lists, observe-free rows; and bare) runs no op
    that reads a device value on the host or has a data-dependent shape; the grouped path (prefill) does, and so
    does an eager CPU step by default (it runs adapters for the routed rows only)."""
    model = RoutedModel(tiny64("qwen2", seed=4))
    for expert in experts_for(model, 3, seed=9):
        model.plug(expert)
    decoder = StaticDecoder(model, max_batch=4, max_len=32, fixed_ops=True)
    prompts = prompts_of(5)[:3]
    specs = [RoutingSpec("token"), RoutingSpec("pin", "e1"), RoutingSpec(allow=("e0",))]
    pre = prefill(model, prompts, specs)
    slots = [decoder.join(pre, row) for row in range(3)]
    decode_one_token(decoder, slots, [1, 2, 3], specs)  # routing rows written, buffers ready
    b, s = decoder.bucket()
    assert decoder._routing == "rows"
    for mode in ("rows", "token", "off"):  # per-row routing, plain token mode, nothing routes
        watch = HostReads()
        with watch, torch.no_grad():
            decoder._body(b, s, mode, decoder._step_set())
        assert watch.reads == [], (mode, sorted(set(watch.reads)))
        assert len(watch.ops) > 50
    watch = HostReads()
    with watch:
        prefill(model, prompts, specs)
    assert watch.reads, "the check sees host reads where there are some"
    eager = StaticDecoder(model, max_batch=4, max_len=32)
    slots = [eager.join(pre, row) for row in range(3)]
    watch = HostReads()
    with watch:
        decode_one_token(eager, slots, [1, 2, 3], specs)
    assert watch.reads, "an eager CPU step reads each layer's choices"
    with pytest.raises(ValueError, match="fixed_ops"):
        StaticDecoder(model, max_batch=4, max_len=32, compile_backend="aot_eager", fixed_ops=False)


def test_routing_rows_follow_plugs_and_unplugs_between_steps() -> None:
    """Plugs and unplugs between steps apply from the next step: an allow-list loses an unplugged expert and is
    not inherited by the expert that reuses its slot; a pinned row's slot is freed with the row; a plug that
    doubles the storage's capacity keeps every row decoding; a spec naming an expert that is gone is refused."""
    model = RoutedModel(tiny64("llama", seed=6))
    experts = experts_for(model, 4, seed=1)
    for expert in experts[:3]:
        model.plug(expert)
    decoder = StaticDecoder(model, max_batch=4, max_len=64)
    prompts = prompts_of(8)[:4]
    specs = [RoutingSpec("token"), RoutingSpec(allow=("e0",)), RoutingSpec("pin", "e1"), RoutingSpec("off")]
    pre = prefill(model, prompts, specs)
    slots = [decoder.join(pre, row) for row in range(4)]
    last = [int(t) for t in pre.logits.argmax(-1)]

    def step(specs: list[RoutingSpec]) -> list[dict[str, float]]:
        live = [i for i, spec in enumerate(specs) if spec is not None]
        out = decode_one_token(decoder, [slots[i] for i in live], [last[i] for i in live], [specs[i] for i in live])
        for row, i in enumerate(live):
            last[i] = int(out.logits[row].argmax())
        return dict(zip(live, out.row_counts, strict=True))

    layers = model.num_layers
    counts = step(specs)
    assert counts[1]["e0"] > 0 and counts[2]["e1"] == layers
    model.unplug("e0")  # slot 0 disabled; the allow-list row keeps nothing (as the engine resolves it)
    with pytest.raises(UnknownExpertError, match="'e0'"):
        step(specs)
    specs[1] = RoutingSpec(allow=())
    counts = step(specs)
    assert counts[1] == {"e1": 0, "e2": 0, "base": layers} and "e0" not in counts[0]
    model.plug(experts[3])  # e3 takes the free slot 0: the allow-list row must not inherit it
    assert model.plugged.index("e3") == 0
    counts = step(specs)
    assert counts[1]["base"] == layers and counts[0]["e3"] > 0, "token rows see the new expert from this step"
    decoder.leave(slots[2])  # the pinned row ends (the engine finishes it when e1 goes)
    specs[2] = None
    model.unplug("e1")
    generation = model.slots.generation
    for i in range(5, 13):  # eight more experts: the storage doubles (8 -> 16 slots), every tensor moves
        model.plug(tiny_expert(f"x{i}", seed=i, layers=range(layers), threshold=2.0))
    assert model.slots.capacity == 16 and model.slots.generation == generation + 1
    pre = prefill(model, [prompts[2]], [RoutingSpec("token")])
    slots[2], specs[2], last[2] = decoder.join(pre, 0), RoutingSpec("token"), int(pre.logits[0].argmax())
    counts = step(specs)
    assert counts[2]["base"] + counts[2]["e2"] + counts[2]["e3"] == layers, "no pin left in the reused row"
    assert counts[3] == {**dict.fromkeys(model.plugged.names, 0.0), "base": layers}


def test_buckets_columns_and_the_length_limit() -> None:
    model = RoutedModel(tiny64("llama"))
    decoder = StaticDecoder(model, max_batch=6, max_len=40, min_columns=8)
    assert decoder.row_buckets == (1, 2, 4, 6)
    pre = prefill(model, [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]], [RoutingSpec("off")] * 2)
    a, b = decoder.join(pre, 0), decoder.join(pre, 1)
    assert (a, b) == (0, 1) and decoder.bucket() == (2, 16) and decoder.columns == 16
    decoder.leave(a)
    assert decoder.bucket() == (2, 16), "rows run up to the highest live slot"
    c = decoder.join(prefill(model, [[7, 7]], [RoutingSpec("off")]), 0)
    assert c == 0, "the lowest free slot is reused"
    decoder.leave(b)
    assert decoder.bucket() == (1, 8)
    with pytest.raises(ValueError, match="no room to decode within 40 columns"):
        decoder.join(prefill(model, [list(range(1, 41))], [RoutingSpec("off")]), 0)
    with pytest.raises(RuntimeError, match="every live slot"):
        decode_one_token(decoder, [], [], [])

    tokenizer = tiny_tokenizer()
    small = RoutedModel(tiny64("llama"))
    small.backbone.config.max_position_embeddings = 12  # the context: prompt and generated tokens fill it
    prompt = "The quick brown fox"
    n = len(tokenizer(prompt)["input_ids"])
    (out,) = generate(small, tokenizer, [prompt], RoutingSpec("off"), 50)
    assert out.finish_reason == "length" and len(out.token_ids) == 12 - n
    with pytest.raises(ValueError, match="the context limit is 12"):
        generate(small, tokenizer, ["The quick brown fox jumps over the lazy dog " * 3], RoutingSpec("off"), 5)


def test_an_eager_step_attends_its_rows_columns_to_the_grain(monkeypatch: pytest.MonkeyPatch) -> None:
    """An eager step attends the longest row's columns rounded up to COLUMN_GRAIN, not the whole allocation (which
    still doubles), and decodes exactly as a step over the allocation's power-of-two bucket."""
    model = RoutedModel(tiny64("llama", seed=1))
    prompt, steps = list(range(1, 21)), 50

    def run(grain: int) -> tuple[list[tuple[int, int, int]], list[torch.Tensor]]:
        monkeypatch.setattr(static_decoder, "COLUMN_GRAIN", grain)
        decoder = StaticDecoder(model, max_batch=2, max_len=128, min_columns=64)
        pre = prefill(model, [prompt], [RoutingSpec("off")])
        slot, token = decoder.join(pre, 0), int(pre.logits[0].argmax())
        seen, logits = [], []
        for _ in range(steps):
            seen.append((*decoder.bucket(), decoder.columns))
            out = decode_one_token(decoder, [slot], [token], [RoutingSpec("off")])
            logits.append(out.logits[0])
            token = int(out.logits[0].argmax())
        return seen, logits

    fine, fine_logits = run(16)
    coarse, coarse_logits = run(1024)
    assert fine[0] == (1, 32, 64), "21 columns needed: two grains of 16 attended, 64 allocated"
    assert (1, 80, 128) in fine and fine[-1] == (1, 80, 128), "past 64 the allocation doubles, attention grows by 16"
    assert {s for _, s, _ in fine} == {32, 48, 64, 80}
    assert {s for _, s, _ in coarse} == {64, 128}, "a grain past the bucket: the power-of-two buckets as before"
    for a, b in zip(fine_logits, coarse_logits, strict=True):
        torch.testing.assert_close(a, b)


def test_capture_is_refused_where_it_cannot_work() -> None:
    model = RoutedModel(tiny64("llama"))
    assert capture_refusal(model) == "CUDA graphs need a CUDA device"
    with pytest.raises(ValueError, match="cannot capture decode steps: CUDA graphs need a CUDA device"):
        StaticDecoder(model, max_batch=2, max_len=16, capture=True)


def test_warm_up_before_a_capture_leaves_the_rows_as_they_were() -> None:
    """What a capture runs first (twice, on CUDA) when a row already sits at its bucket's last column: no step
    indexes past the bucket, pos and the mask are put back, and the next real step equals a decoder that never
    warmed up."""
    model = RoutedModel(tiny64("llama", seed=2))
    for expert in experts_for(model, 2, seed=4):
        model.plug(expert)
    prompts, specs = [[1, 2, 3, 4, 5, 6, 7], [8, 9]], [RoutingSpec("token"), RoutingSpec("pin", "e1")]
    outputs = []
    for warm in (False, True):
        decoder = StaticDecoder(model, max_batch=2, max_len=8, min_columns=8)
        pre = prefill(model, prompts, specs)
        slots = [decoder.join(pre, row) for row in range(2)]
        assert decoder.bucket() == (2, 8) and decoder.lengths[0] + 1 == 8, "row 0 takes the bucket's last column"
        if warm:
            decoder._sync_routing(decoder.plugged)
            pos, bias = decoder.pos.clone(), decoder.bias.clone()
            with torch.no_grad():
                decoder._warm_up(2, 8, decoder._routing, decoder._step_set(), times=3)
            assert torch.equal(decoder.pos, pos) and torch.equal(decoder.bias, bias)
        outputs.append(decode_one_token(decoder, slots, [7, 7], specs))
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, atol=0, rtol=0)
    assert outputs[1].row_counts == outputs[0].row_counts


def _compiled_against_eager(backend: str, steps: int) -> None:
    """A compiled routed step (fullgraph: no graph break; static shapes) against eager: two rows from the start,
    the first leaves and a third takes its slot (one bucket throughout, so one graph)."""
    model = RoutedModel(tiny64("llama", seed=1).float())
    for expert in experts_for(model, 2, seed=3):
        model.plug(expert)
    prompts = [[5, 6, 7], [9, 10, 11, 12], [3, 1, 4, 1, 5]]
    specs = [RoutingSpec("token"), RoutingSpec("pin", "e1"), RoutingSpec(allow=("e0",))]
    results = []
    for compiled in (None, backend):
        decoder = StaticDecoder(model, max_batch=2, max_len=32, min_columns=32, compile_backend=compiled)
        pre = prefill(model, prompts[:2], specs[:2])
        rows = [(decoder.join(pre, i), int(pre.logits[i].argmax()), specs[i]) for i in range(2)]  # (slot, last, spec)
        tokens, logits = [], []
        for t in range(steps):
            if t == steps // 2:  # the first leaves, a third joins its slot
                decoder.leave(rows[0][0])
                pre = prefill(model, prompts[2:], specs[2:])
                rows[0] = (decoder.join(pre, 0), int(pre.logits[0].argmax()), specs[2])
            out = decode_one_token(decoder, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
            rows = [(slot, int(x), spec) for (slot, _, spec), x in zip(rows, out.logits.argmax(-1), strict=True)]
            tokens.append([r[1] for r in rows])
            logits.append(out.logits.clone())
        assert len(decoder._compiled) == (1 if compiled else 0)
        results.append((tokens, logits))
    (eager_tokens, eager_logits), (compiled_tokens, compiled_logits) = results
    assert compiled_tokens == eager_tokens
    for a, b in zip(eager_logits, compiled_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_traced_step_has_no_graph_break_and_equals_eager() -> None:
    """Dynamo traces the whole routed step as one graph (fullgraph) and AOT functionalises it (aot_eager: the
    in-place KV and position writes survive): the same tokens as eager."""
    _compiled_against_eager("aot_eager", steps=10)


@pytest.mark.slow
def test_an_inductor_compiled_step_equals_eager() -> None:
    """The same with inductor's generated code (what runs on a GPU, minus the CUDA graph)."""
    _compiled_against_eager("inductor", steps=6)


def _compiled_across_buckets(backend: str) -> None:
    """A compiled step survives the rows' growth: the buffers hold every column from the start (nothing to
    reallocate), and one graph per routing mode serves every column count. Five rows decode while their longest
    grows from 8 to 40 attended columns (five counts), rows leave (the row bucket falls 8 -> 4 -> 2), then two
    fresh short rows run the 8-column bucket again, and every token equals the eager decoder's. b and s are sizes of the
    compiled function's arguments (the row views, the mask view), not constants: two graphs in all, one for rows at
    or above the slot capacity (8) and one below, where the bottleneck dispatch takes its gathered form
    (moe.adapters.bottleneck.slot_dispatch decides by rows against capacity); none per column count."""
    model = RoutedModel(tiny64("llama", seed=1).float())
    for expert in experts_for(model, 2, seed=3):
        model.plug(expert)
    waves = [[[5, 6, 7], [9, 10, 11, 12], [1, 2], [7, 7, 7, 7, 7], [8]], [[3, 1], [4, 1, 5]]]
    leaving = {8: 2, 16: 1}  # step of the first wave -> how many of the highest slots leave before it
    spec = RoutingSpec("token")
    results = []
    for compiled in (None, backend):
        torch._dynamo.reset()
        counters.clear()
        decoder = StaticDecoder(model, max_batch=8, max_len=64, min_columns=8, compile_backend=compiled)
        tokens, graphs, buckets = [], [], []
        for wave, steps in zip(waves, (36, 10), strict=True):
            decoder.reset()
            pre = prefill(model, wave, [spec] * len(wave))
            rows = {decoder.join(pre, i): int(pre.logits[i].argmax()) for i in range(len(wave))}  # slot -> token
            for t in range(steps):
                for _ in range(leaving.get(t, 0) if len(wave) > 2 else 0):
                    decoder.leave(max(rows))
                    rows.pop(max(rows))
                slots = sorted(rows)
                buckets.append(decoder.bucket())
                out = decode_one_token(decoder, slots, [rows[s] for s in slots], [spec] * len(slots))
                rows = {slot: int(x) for slot, x in zip(slots, out.logits.argmax(-1), strict=True)}
                tokens.append([rows[s] for s in slots])
                graphs.append(counters["stats"]["unique_graphs"])
        assert decoder.columns == 64
        results.append(tokens)
    # columns attended grow in steps of COLUMN_GRAIN (8) as the longest row does (up to 5 + 36 tokens)
    assert {s for _, s in buckets} == {8, 16, 24, 32, 40} and {b for b, _ in buckets} == {8, 4, 2}
    assert buckets[36] == (2, 8), "the second wave runs the first column bucket again"
    assert graphs == [1] * 8 + [2] * (len(graphs) - 8), "rows >= capacity, then fewer; no column bucket compiles"
    assert results[1] == results[0]


def test_a_compiled_step_serves_every_bucket_without_recompiling() -> None:
    """aot_eager: dynamo's guards and AOT's functionalisation over dynamic rows and columns (no generated code)."""
    _compiled_across_buckets("aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor's CPU backend needs a C++ compiler (g++)"
)
def test_an_inductor_compiled_step_serves_every_bucket_without_recompiling() -> None:
    """The same with inductor's generated code (kernels over symbolic rows and columns)."""
    _compiled_across_buckets("inductor")
