"""Penalties, logit bias, min_tokens, stop_token_ids, grammar masks and logprobs in moe.decode.sampling: the batched
path (one op per step over rows with different settings) checked row by row against transformers' logits
processors where one exists, and against the definitions where none does (presence/frequency: OpenAI's)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from moe.decode.sampling import (
    AllowedTokens,
    SamplingParams,
    SamplingParamsError,
    process_logits,
    prompt_logprobs,
    sample_step,
    token_mask,
)

V = 50
EOS = (0,)


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed)) * 3


def _histories(batch: int, seed: int = 1) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, V, (5 + i,), generator=g).tolist() for i in range(batch)]
    outputs = [torch.randint(1, V, (3 * i,), generator=g).tolist() for i in range(batch)]  # row 0: nothing yet
    return prompts, outputs


def test_repetition_penalty_matches_hf_row_by_row() -> None:
    penalties = [1.0, 1.3, 0.7, 2.0]
    logits = _logits(4)
    prompts, outputs = _histories(4)
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    got = process_logits(logits, params, [len(o) for o in outputs], EOS, prompts, outputs)
    for i, penalty in enumerate(penalties):
        ids = torch.tensor([prompts[i] + outputs[i]])
        want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[i : i + 1].clone())[0]
        torch.testing.assert_close(got[i], want)


def test_presence_and_frequency_penalties_follow_openai_definition() -> None:
    """logit[t] -= frequency * count(t) + presence * (count(t) > 0), counts over generated tokens only."""
    settings = [(0.0, 0.0), (0.5, 0.0), (0.0, 1.5), (-1.0, 2.0)]
    logits = _logits(4)
    prompts, outputs = _histories(4)
    outputs[3] = outputs[3] + outputs[3][:2]  # a token generated twice
    params = [SamplingParams(presence_penalty=p, frequency_penalty=f) for p, f in settings]
    got = process_logits(logits, params, [len(o) for o in outputs], EOS, prompts, outputs)
    for i, (presence, frequency) in enumerate(settings):
        want = logits[i].clone()
        for t in range(V):
            count = outputs[i].count(t)
            want[t] -= frequency * count + presence * (count > 0)
        torch.testing.assert_close(got[i], want)
        prompt_only = set(prompts[i]) - set(outputs[i])
        for t in prompt_only:  # the prompt never counts
            assert got[i, t] == logits[i, t]


def test_logit_bias_matches_hf_sequence_bias() -> None:
    biases = [((3, 5.0), (7, -100.0)), (), ((3, 100.0),)]
    logits = _logits(3)
    params = [SamplingParams(logit_bias=b) for b in biases]
    got = process_logits(logits, params, [0, 0, 0], EOS)
    for i, bias in enumerate(biases):
        want = logits[i : i + 1].clone()
        if bias:
            want = SequenceBiasLogitsProcessor({(t,): b for t, b in bias})(torch.tensor([[1]]), want)
        torch.testing.assert_close(got[i], want[0])
    assert sample_step(logits, params, [None] * 3, [0, 0, 0], EOS).tokens[2] == 3  # +100 wins greedy


def test_min_tokens_blocks_eos_and_stop_token_ids_like_hf() -> None:
    logits = _logits(3)
    logits[:, 0] = 50.0  # EOS would win
    logits[:, 9] = 40.0  # then the stop token
    params = [
        SamplingParams(min_new_tokens=2, stop_token_ids=(9,)),
        SamplingParams(min_new_tokens=2, stop_token_ids=(9,)),
        SamplingParams(),
    ]
    steps = [1, 2, 0]
    got = process_logits(logits, params, steps, EOS)
    want = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=4, min_new_tokens=2, eos_token_id=[0, 9])(
        torch.zeros(1, 4 + 1, dtype=torch.long), logits[0:1].clone()
    )[0]
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got[1:], logits[1:])  # row 1 reached its minimum; row 2 has none
    assert sample_step(logits, params, [None] * 3, steps, EOS).tokens == [int(want.argmax()), 0, 0]


def test_penalties_change_greedy_choice_as_defined() -> None:
    logits = torch.full((3, V), -5.0)
    logits[:, 4], logits[:, 6] = 3.0, 2.5  # 4 is the greedy choice; 6 the runner-up
    outputs = [[4], [4, 4, 4], [4]]
    params = [
        SamplingParams(presence_penalty=1.0),  # 3 - 1 = 2 < 2.5
        SamplingParams(frequency_penalty=0.2),  # 3 - 0.6 = 2.4 < 2.5
        SamplingParams(repetition_penalty=1.3),  # 3 / 1.3 = 2.31 < 2.5
    ]
    plain = sample_step(logits, [SamplingParams()] * 3, [None] * 3, [1, 3, 1], EOS, [[1]] * 3, outputs)
    assert plain.tokens == [4, 4, 4]
    assert sample_step(logits, params, [None] * 3, [1, 3, 1], EOS, [[1]] * 3, outputs).tokens == [6, 6, 6]
    gentle = [SamplingParams(presence_penalty=0.4), SamplingParams(frequency_penalty=0.1)]
    assert sample_step(logits[:2], gentle, [None] * 2, [1, 3], EOS, [[1]] * 2, outputs[:2]).tokens == [4, 4]


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (8, 0.3)])
def test_top_k_top_p_support_matches_hf_warpers(top_k: int, top_p: float) -> None:
    logits = _logits(1, seed=5)
    params = [SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=0)]
    gen = params[0].generator()
    drawn = {sample_step(logits, params, [gen], [3], EOS).tokens[0] for _ in range(400)}
    want = logits.clone()
    if top_k:
        want = TopKLogitsWarper(top_k)(torch.zeros(1, 1, dtype=torch.long), want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(torch.zeros(1, 1, dtype=torch.long), want)
    support = set(torch.isfinite(want[0]).nonzero().flatten().tolist())
    assert drawn <= support and len(drawn) >= min(len(support), 2)


def test_mixed_batch_equals_each_row_alone() -> None:
    """One batched call over rows with different settings gives each row what it gets alone."""
    logits = _logits(5, seed=3)
    prompts, outputs = _histories(5)
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.5, presence_penalty=0.3),
        SamplingParams(frequency_penalty=1.0, logit_bias=((2, 4.0),), min_new_tokens=9),
        SamplingParams(temperature=0.8, seed=4, logit_bias=((5, -3.0),), logprobs=3),
        SamplingParams(temperature=1.2, seed=5, top_k=7, repetition_penalty=0.8, logprobs=0),
    ]
    steps = [len(o) for o in outputs]
    gens = [p.generator() for p in params]
    together = sample_step(logits, params, gens, steps, EOS, prompts, outputs)
    processed = process_logits(logits, params, steps, EOS, prompts, outputs)
    for i in range(5):
        alone_gen = params[i].generator()
        alone = sample_step(logits[i : i + 1], [params[i]], [alone_gen], [steps[i]], EOS, [prompts[i]], [outputs[i]])
        assert alone.tokens[0] == together.tokens[i]
        assert alone.logprobs[0] == together.logprobs[i]
        one = process_logits(logits[i : i + 1], [params[i]], [steps[i]], EOS, [prompts[i]], [outputs[i]])
        torch.testing.assert_close(one[0], processed[i])


def test_logprobs_are_the_raw_distribution_with_top_k() -> None:
    logits = _logits(3, seed=7)
    params = [
        SamplingParams(logprobs=0),
        SamplingParams(logprobs=4, frequency_penalty=2.0, temperature=0.5, seed=1),
        SamplingParams(),
    ]
    gens = [p.generator() for p in params]
    out = sample_step(logits, params, gens, [1, 1, 1], EOS, [[1]] * 3, [[2], [2], [2]])
    reference = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for i in (0, 1):
        entry = out.logprobs[i]
        assert entry.token == out.tokens[i]
        assert entry.logprob == pytest.approx(float(reference[i, entry.token]), abs=1e-5)
        assert len(entry.top) == params[i].logprobs
        values, ids = reference[i].topk(len(entry.top))
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-5)


def test_prompt_logprobs_equal_log_softmax_of_each_position() -> None:
    logits = _logits(6, seed=9)  # [T, V]: position j predicts token j + 1
    ids = [1, 5, 7, 7, 2, 30]
    entries = prompt_logprobs(logits, ids, k=2)
    reference = torch.log_softmax(logits, dim=-1)
    assert entries[0] is None and len(entries) == len(ids)
    for j in range(1, len(ids)):
        assert entries[j].token == ids[j]
        assert entries[j].logprob == pytest.approx(float(reference[j - 1, ids[j]]), abs=1e-5)
        assert [t for t, _ in entries[j].top] == reference[j - 1].topk(2).indices.tolist()


def test_token_mask_unpacks_bits_like_the_plain_loop() -> None:
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 2), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    vocab = 50  # narrower than the 64 bits
    got = token_mask(bitmask, vocab)
    for r in range(3):
        for v in range(vocab):
            word = int(bitmask[r, v // 32]) & 0xFFFFFFFF
            assert bool(got[r, v]) == bool((word >> (v % 32)) & 1)
    assert token_mask(bitmask, 70)[:, 64:].any().item() is False  # ids past the mask are never allowed


def test_allowed_tokens_mask_only_their_rows_and_restore_stops_when_nothing_is_left() -> None:
    logits = _logits(3, seed=11)
    allowed_ids = [[3, 4], [0]]  # row 2: a finished grammar allows only EOS
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    for r, ids in enumerate(allowed_ids):
        for t in ids:
            bitmask[r, t // 32] |= 1 << (t % 32)
    allowed = AllowedTokens([0, 2], bitmask)
    params = [SamplingParams(), SamplingParams(), SamplingParams(min_new_tokens=5)]
    x = process_logits(logits, params, [0, 0, 0], EOS, allowed=allowed)
    assert set(torch.isfinite(x[0]).nonzero().flatten().tolist()) == {3, 4}
    torch.testing.assert_close(x[1], logits[1])  # unconstrained
    # min_tokens blocked EOS, the grammar allows only EOS: EOS comes back rather than nothing at all
    assert torch.isfinite(x[2]).nonzero().flatten().tolist() == [0]
    assert sample_step(logits, params, [None] * 3, [0, 0, 0], EOS, allowed=allowed).tokens[2] == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"repetition_penalty": 0},
        {"repetition_penalty": 5e-324},  # a denormal: dividing by it overflowed logits to inf (schemathesis)
        {"repetition_penalty": 101.0},
        {"logit_bias": ((1, 101.0),)},
        {"logit_bias": ((-1, 1.0),)},
        {"stop_token_ids": (-2,)},
        {"logprobs": -1},
        {"temperature": float("nan")},
    ],
)
def test_bad_processor_params_are_refused(kwargs: dict) -> None:
    with pytest.raises(SamplingParamsError):
        SamplingParams(**kwargs)
