"""Per-row sampling: greedy, temperature, top_k, top_p, seeds and min_new_tokens, checked row by row."""

from __future__ import annotations

import pytest
import torch

from moe.decode.sampling import SamplingParams, SamplingParamsError, greedy_tokens, sample

LOGITS = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0], [2.5, 0.0, 0.1, 0.2, 2.4]])


def _draw(params: list[SamplingParams], n: int = 200, steps: list[int] | None = None, eos=()) -> list[list[int]]:
    gens = [p.generator() for p in params]
    return [sample(LOGITS, params, gens, steps or [10] * len(params), eos) for _ in range(n)]


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    draws = _draw([SamplingParams(), SamplingParams(temperature=1.0, seed=1)])
    assert {d[0] for d in draws} == {1}
    assert len({d[1] for d in draws}) > 1


def test_greedy_is_the_first_maximal_token_as_argmax() -> None:
    """Ties (the first of the tied tokens), rows blocked to -inf everywhere and NaN rows: argmax's token, which is
    what HF generate's greedy search takes."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3000, generator=generator)
    logits[:, 2999] = logits[:, 7] = logits[:, 1500] = 1e4  # three-way ties
    logits[5:9] = float("-inf")
    logits[9, 11] = logits[9, 40] = float("nan")
    logits[10] = logits[10].round()  # many small ties below the maximum
    logits[11, :] = 1.0
    tokens = sample(logits, [SamplingParams()] * 64, [None] * 64, [10] * 64)
    assert tokens == logits.argmax(dim=-1).tolist() == greedy_tokens(logits)
    assert (
        greedy_tokens(logits.double()) == tokens and greedy_tokens(logits[:, ::2]) == logits[:, ::2].argmax(-1).tolist()
    )
    assert tokens[0] == 7 and tokens[5] == 0 and tokens[9] == 11 and tokens[11] == 0


def test_same_seed_same_tokens_different_seed_differs() -> None:
    a = _draw([SamplingParams(temperature=1.0, seed=7)] * 2)
    b = _draw([SamplingParams(temperature=1.0, seed=7)] * 2)
    c = _draw([SamplingParams(temperature=1.0, seed=8)] * 2)
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(temperature=1.0, top_k=2, seed=0), [{1, 3}, {0, 4}]),
        (SamplingParams(temperature=1.0, top_k=1, seed=0), [{1}, {0}]),
        # row 0: p(1) ~ 0.64, p(3) ~ 0.24 -> nucleus 0.7 keeps {1, 3}; row 1: p(0) ~ p(4) ~ 0.43
        (SamplingParams(temperature=1.0, top_p=0.7, seed=0), [{1, 3}, {0, 4}]),
        (SamplingParams(temperature=1.0, top_p=0.01, seed=0), [{1}, {0}]),
    ],
)
def test_top_k_and_top_p_restrict_each_row(params: SamplingParams, allowed: list[set[int]]) -> None:
    draws = _draw([params, params], n=300)
    for row in range(2):
        assert {d[row] for d in draws} == allowed[row]


def test_min_new_tokens_masks_eos_until_reached() -> None:
    params = [SamplingParams(min_new_tokens=3), SamplingParams(min_new_tokens=3)]
    assert sample(LOGITS, params, [None, None], [0, 3], eos_ids=(1,)) == [3, 0]


def test_low_temperature_is_nearly_greedy() -> None:
    draws = _draw([SamplingParams(temperature=0.05, seed=3)] * 2)
    assert {d[0] for d in draws} == {1}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"repetition_penalty": 0},
        {"repetition_penalty": 5e-324},  # divided a logit into inf
        {"repetition_penalty": 1000},
    ],
)
def test_bad_params_are_refused(kwargs: dict) -> None:
    with pytest.raises(SamplingParamsError):
        SamplingParams(**kwargs)
