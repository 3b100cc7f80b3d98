"""The one generation path: prefill (the sequence-mode protocol, each row's keys and values), the fixed-slot
decoder with joins and drops equal to each sequence decoded alone, a cached step equal to a full forward, and
generate's stops. The decoder's own buffers, buckets, capture safety and routing rows: test_static_decode.py."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from moe import RoutedModel, RoutingSpec
from moe.decode.generation import generate
from moe.decode.prefill import prefill, prefill_rows
from moe.decode.scheduler import eos_token_ids
from moe.decode.static_decoder import StaticDecoder, decode_one_token
from tests.tiny import FAMILIES, tiny_backbone, tiny_config, tiny_expert, tiny_tokenizer

PROMPTS = [[5, 17, 42, 9], [7, 3], [11, 12, 13, 14, 15, 16, 17], [100, 101, 102]]
STEPS = 6


def _routed(family: str) -> RoutedModel:
    model = RoutedModel(tiny_backbone(family, seed=1))
    # an always-eligible expert with a nonzero adapter, so token routing changes the logits
    model.plug(tiny_expert("shouty", hidden=model.hidden_size, layers=range(model.num_layers), threshold=-2.0))
    return model


@torch.inference_mode()
def _alone(model: RoutedModel, prompt: list[int], spec: RoutingSpec, steps: int) -> list[torch.Tensor]:
    """Greedy decode one sequence by itself through the routed forward and a plain DynamicCache (no slots,
    no static mask): the logits of each step."""
    cache = DynamicCache()
    out = model(torch.tensor([prompt]), routing=[spec], past_key_values=cache, use_cache=True)
    logits = [out.logits[0, -1]]
    for _ in range(steps - 1):
        token = logits[-1].argmax().view(1, 1)
        logits.append(model(token, routing=[spec], past_key_values=cache, use_cache=True).logits[0, -1])
    return logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_joins_and_drops_match_decoding_alone(family: str) -> None:
    model = _routed(family)
    specs = [RoutingSpec("token"), RoutingSpec("off"), RoutingSpec("pin", expert="shouty"), RoutingSpec("token")]
    expected = [_alone(model, p, s, STEPS) for p, s in zip(PROMPTS, specs, strict=True)]

    # rows 0 and 1 start together (one padded prefill), row 2 joins after 2 steps, row 3 after 3; row 1 stops
    # early, so row 3 takes its slot
    join_at = {0: [0, 1], 2: [2], 3: [3]}
    decoder = StaticDecoder(model, max_batch=3, max_len=32, min_columns=8)
    slot_of: dict[int, int] = {}
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(PROMPTS))}
    for t in range(STEPS + 3):
        if slot_of:
            live = list(slot_of)
            out = decode_one_token(
                decoder, [slot_of[i] for i in live], [int(got[i][-1].argmax()) for i in live], [specs[i] for i in live]
            )
            for row, i in enumerate(live):
                got[i].append(out.logits[row])
        for i in [i for i in slot_of if len(got[i]) == (3 if i == 1 else STEPS)]:
            decoder.leave(slot_of.pop(i))
        if t in join_at:
            new = join_at[t]
            pre = prefill(model, [PROMPTS[i] for i in new], [specs[i] for i in new])
            for row, i in enumerate(new):
                got[i].append(pre.logits[row])
                slot_of[i] = decoder.join(pre, row)
    assert decoder.live == [] and decoder.free == 3
    for i in range(len(PROMPTS)):
        n = len(got[i])
        assert n == (3 if i == 1 else STEPS)
        torch.testing.assert_close(torch.stack(got[i]), torch.stack(expected[i][:n]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_step_equals_full_forward(family: str) -> None:
    model = _routed(family)
    prompt = PROMPTS[2]
    decoder = StaticDecoder(model, max_batch=2, max_len=16)
    slot = decoder.join(prefill(model, [prompt[:-1]], [RoutingSpec("off")]), 0)
    step = decode_one_token(decoder, [slot], [prompt[-1]], [RoutingSpec("off")])
    with torch.inference_mode():
        full = model(torch.tensor([prompt]), routing=[RoutingSpec("off")]).logits[0, -1]
        plain = model.backbone(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(step.logits[0], full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, plain, atol=0, rtol=0)


def test_prefill_keeps_each_rows_real_keys_and_values() -> None:
    model = _routed("llama")
    kv, _ = prefill_rows(model, [PROMPTS[2], PROMPTS[1]], [RoutingSpec()] * 2)
    assert kv.lengths == [7, 2] and kv.layers[0][0].shape[2] == 7, "rows are left-padded to the longest"
    alone, _ = prefill_rows(model, [PROMPTS[1]], [RoutingSpec()])
    for (k, v), (k1, v1) in zip(kv.row(1), alone.row(0), strict=True):
        assert k.shape[1] == 2
        torch.testing.assert_close(k, k1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v1, atol=1e-5, rtol=1e-5)


def test_trace_counts_real_tokens_only() -> None:
    model = _routed("llama")
    specs = [RoutingSpec("off"), RoutingSpec("pin", expert="shouty")]
    _, out = prefill_rows(model, [PROMPTS[0], PROMPTS[1]], specs)
    layers = model.num_layers
    assert out.row_counts[0] == {"shouty": 0.0, "base": 4.0 * layers}
    assert out.row_counts[1] == {"shouty": 2.0 * layers, "base": 0.0}


# --- prefill: sequence mode ---------------------------------------------------------------------------------


def _same_kv(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether two rows cache the same keys and values on every layer, bit for bit."""
    return all(torch.equal(ka, kb) and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(a, b, strict=True))


def test_prefill_sequence_mode_observes_then_decides_and_keeps_the_callers_order() -> None:
    model = _routed("llama")  # 'shouty' passes on every token
    model.plug(tiny_expert("quiet", hidden=model.hidden_size, layers=range(model.num_layers), seed=1))  # closed
    layers = model.num_layers
    prompts = [[5, 17, 42, 9], [7, 3], [11, 12, 13, 14, 15, 16, 17], [100, 101, 102], [30, 31, 32, 33, 34], [8, 9]]
    specs = [
        RoutingSpec("sequence"),  # undecided: its prompt picks 'shouty'
        RoutingSpec("token"),
        RoutingSpec("sequence", allow=("quiet",)),  # undecided: 'quiet' never passes, so base
        RoutingSpec("off"),
        RoutingSpec("sequence", expert="shouty"),  # decided already: prefilled as it is
        RoutingSpec("sequence", allow=("quiet",)),  # base, a shorter prompt
    ]
    pre = prefill(model, prompts, specs)

    assert pre.specs == [
        RoutingSpec("sequence", expert="shouty"),
        RoutingSpec("token"),
        RoutingSpec("sequence", expert="base", allow=("quiet",)),
        RoutingSpec("off"),
        RoutingSpec("sequence", expert="shouty"),
        RoutingSpec("sequence", expert="base", allow=("quiet",)),
    ]
    # rows come back in the caller's order, each with its own length
    assert len(pre) == len(prompts) and pre.logits.shape[0] == len(prompts)
    assert [pre.length(row) for row in range(len(prompts))] == [len(p) for p in prompts]
    assert all(k.shape[1] == len(p) for row, p in enumerate(prompts) for k, _ in pre.row_kv(row))

    # the protocol spelled out: the undecided rows observed together on the backbone ...
    undecided = [0, 2, 5]
    observed, seen = prefill_rows(
        model, [prompts[r] for r in undecided], [specs[r] for r in undecided], observe=[True] * 3
    )
    backbone, plain = prefill_rows(model, [prompts[r] for r in undecided], [RoutingSpec("off")] * 3)
    assert torch.equal(seen.logits, plain.logits), "observing is the backbone, bit for bit"
    # ... a row that chose base keeps those keys, values and logits: the `off` prefill's, bit for bit ...
    for position, row in ((1, 2), (2, 5)):
        assert torch.equal(pre.logits[row], plain.logits[position])
        assert _same_kv(pre.row_kv(row), backbone.row(position))
    # ... and every other row is prefilled again, together, with its final spec (a chosen expert pinned)
    redo = [0, 1, 3, 4]
    again, out = prefill_rows(model, [prompts[r] for r in redo], [pre.specs[r] for r in redo])
    for position, row in enumerate(redo):
        assert torch.equal(pre.logits[row], out.logits[position])
        assert pre.row_counts[row] == out.row_counts[position]
        assert _same_kv(pre.row_kv(row), again.row(position))
    _, pinned = prefill_rows(model, [prompts[0]], [RoutingSpec("sequence", expert="shouty")])
    torch.testing.assert_close(pre.logits[0], pinned.logits[0], atol=1e-5, rtol=1e-4)

    # row_counts: the decisions applied to each prompt, every route keyed; layer_counts: summed over rows
    n = [len(p) * layers for p in prompts]
    assert pre.row_counts == [
        {"shouty": n[0], "quiet": 0, "base": 0},
        {"shouty": n[1], "quiet": 0, "base": 0},
        {"shouty": 0, "quiet": 0, "base": n[2]},
        {"shouty": 0, "quiet": 0, "base": n[3]},
        {"shouty": n[4], "quiet": 0, "base": 0},
        {"shouty": 0, "quiet": 0, "base": n[5]},
    ]
    on_expert = len(prompts[0]) + len(prompts[1]) + len(prompts[4])
    on_base = len(prompts[2]) + len(prompts[3]) + len(prompts[5])
    assert pre.layer_counts == [{"shouty": on_expert, "quiet": 0, "base": on_base}] * layers

    # the rows decode on: one step of every row equals that row decoded alone after its own prefill
    tokens = [int(t) for t in pre.logits.argmax(dim=-1)]
    decoder = StaticDecoder(model, max_batch=len(prompts), max_len=16)
    slots = [decoder.join(pre, row) for row in range(len(prompts))]
    step = decode_one_token(decoder, slots, tokens, pre.specs)
    for row, prompt in enumerate(prompts):
        want = _alone(model, prompt, pre.specs[row], 2)[1]
        torch.testing.assert_close(step.logits[row], want, atol=1e-4, rtol=1e-4)


def test_prefill_without_undecided_rows_is_one_prefill() -> None:
    model = _routed("llama")
    specs = [RoutingSpec("off"), RoutingSpec("pin", expert="shouty")]
    pre = prefill(model, PROMPTS[:2], specs)
    kv, out = prefill_rows(model, PROMPTS[:2], specs)
    assert pre.specs == specs and torch.equal(pre.logits, out.logits)
    assert pre.row_counts == out.row_counts and pre.layer_counts == out.layer_counts
    assert all(_same_kv(pre.row_kv(row), kv.row(row)) for row in range(2))


# --- generate -----------------------------------------------------------------------------------------------


def test_generate_stops_at_every_eos_id_and_says_why() -> None:
    tokenizer = tiny_tokenizer()
    model = RoutedModel(tiny_backbone("llama", seed=0, vocab=len(tokenizer)))
    prompts = ["The quick brown fox", "def add(a, b):", "0123456789 + -"]
    free = generate(model, tokenizer, prompts, RoutingSpec("off"), 12)  # EOS is token 0 only
    assert eos_token_ids(model, tokenizer) == (0,)
    greedy = [g.token_ids for g in free]
    assert all(len(g.token_ids) == 12 and g.finish_reason == "length" for g in free), "the case needs no early EOS"
    # a generation config that lists two more EOS ids, one taken from each of the first two rows
    first, second = greedy[0][3], greedy[1][5]
    model.backbone.generation_config.eos_token_id = [second, first]
    assert eos_token_ids(model, tokenizer) == tuple(sorted({0, first, second}))
    stops = {0, first, second}
    cut = [next((i for i, t in enumerate(g) if t in stops), None) for g in greedy]
    assert cut[0] is not None and greedy[0][cut[0]] == first and cut[1] is not None and greedy[1][cut[1]] == second
    assert cut[2] is None, "the case needs a row that runs to the length limit"

    results = generate(model, tokenizer, prompts, RoutingSpec("off"), 12, batch_size=3)
    for g, tokens, at in zip(results, greedy, cut, strict=True):
        if at is None:
            assert (g.token_ids, g.finish_reason) == (tokens, "length")
        else:  # the EOS rule (moe.decode.sequence): token_ids keep the ending EOS id, the text never has it
            assert (g.token_ids, g.finish_reason) == (tokens[: at + 1], "stop")
        assert g.text == tokenizer.decode(tokens[:at], skip_special_tokens=True)
        assert g.route is None


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_transformers_generate(family: str) -> None:
    """generate (prefill, then the fixed-slot decoder; 4 prompts through 2 slots) gives, token for token, what
    transformers' own greedy `generate` gives for each prompt alone, up to and including its EOS."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(family, vocab=len(tokenizer))
    config.initializer_range = 0.2  # the default repeats one token forever: a weak test
    torch.manual_seed(7)
    plain = AutoModelForCausalLM.from_config(config).eval().double()
    model = RoutedModel(copy.deepcopy(plain))
    prompts = ["The quick brown fox", "def add(a, b):", "Mia walks to the market.", "0123456789 + -"]
    got = generate(model, tokenizer, prompts, RoutingSpec("off"), 20, batch_size=2)
    for prompt, g in zip(prompts, got, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = plain.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=0)
        want = out[0, ids.shape[1] :].tolist()
        want = want[: want.index(0) + 1] if 0 in want else want
        assert g.token_ids == want, prompt
        assert g.finish_reason == ("stop" if 0 in want else "length")
        assert g.text == tokenizer.decode(want, skip_special_tokens=True)
    assert len({tuple(g.token_ids) for g in got}) == len(prompts), "the case needs distinct sequences"


def test_generate_reports_the_sequence_route_and_every_decision() -> None:
    tokenizer = tiny_tokenizer()
    model = RoutedModel(tiny_backbone("llama", seed=0, vocab=len(tokenizer)))
    model.plug(tiny_expert("open", threshold=-2.0))
    model.plug(tiny_expert("shut", seed=1))
    prompts = ["The quick brown fox", "def add(a, b):"]
    results = generate(model, tokenizer, prompts, [RoutingSpec("sequence"), RoutingSpec("token")], 6)
    for g, prompt, route in zip(results, prompts, ["open", None], strict=True):
        assert g.route == route and g.finish_reason == "length" and len(g.token_ids) == 6
        fed = len(tokenizer(prompt)["input_ids"]) + len(g.token_ids) - 1  # the last token is never fed back
        assert g.counts == {"open": fed * model.num_layers, "shut": 0, "base": 0}


def test_prefill_prompt_logits_equal_a_full_forward_under_each_rows_routing() -> None:
    """prompt_logits=True keeps every prompt position's logits, also through sequence mode's two prefills
    (a row that chose base keeps its observed pass, the others are prefilled again with their expert)."""
    model = _routed("llama")
    specs = [RoutingSpec("sequence"), RoutingSpec("token"), RoutingSpec("sequence", allow=()), RoutingSpec("off")]
    pre = prefill(model, PROMPTS, specs, prompt_logits=True)
    assert [s.expert for s in pre.specs] == ["shouty", None, "base", None]
    for row, (prompt, spec, logits) in enumerate(zip(PROMPTS, pre.specs, pre.prompt_logits, strict=True)):
        with torch.inference_mode():
            full = model(torch.tensor([prompt]), routing=[spec]).logits[0]  # [T, V]
        assert logits.shape == full.shape
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pre.logits[row], full[-1], atol=1e-4, rtol=1e-4)
    assert prefill(model, PROMPTS, specs).prompt_logits is None
