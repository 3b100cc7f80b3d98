"""The routing trace: counting on the device against a plain loop, and what the counts mean (shares, entropy)."""

from __future__ import annotations

import math

import pytest
import torch

from moe.model.trace import RoutingTrace, add_counts, count_decisions, route_shares, routing_entropy


def reference_counts(
    choices: list[torch.Tensor], valid: torch.Tensor, flat_rows: torch.Tensor, batch: int, experts: int
) -> tuple[list[list[float]], list[list[float]]]:
    """count_decisions as a plain loop: a token with no expert counts once for base (last column), a top-k token
    once per expert it took; padding (valid 0) counts nothing."""
    rows = [[0.0] * (experts + 1) for _ in range(batch)]
    layers = [[0.0] * (experts + 1) for _ in choices]
    for layer, choice in enumerate(choices):
        for n in range(choice.shape[0]):
            if not valid[n]:
                continue
            chosen = [int(e) for e in choice[n] if e >= 0] or [experts]
            for column in chosen:
                rows[int(flat_rows[n])][column] += 1
                layers[layer][column] += 1
    return rows, layers


@pytest.mark.parametrize("top_k", [1, 2])
def test_count_decisions_equals_the_plain_loop(top_k: int) -> None:
    g = torch.Generator().manual_seed(top_k)
    batch, length, experts, num_layers = 3, 7, 4, 3
    n = batch * length
    choices = []  # per layer [N, k]: each token 0..k distinct experts, empty slots (-1) last, as choose_experts
    for _ in range(num_layers):
        choice = torch.full((n, top_k), -1)
        for token in range(n):
            taken = int(torch.randint(0, top_k + 1, (1,), generator=g))
            choice[token, :taken] = torch.randperm(experts, generator=g)[:taken]
        choices.append(choice)
    valid = torch.ones(n)
    valid[length - 2 : length] = 0  # right padding in row 0
    valid[2 * length : 2 * length + 3] = 0  # left padding in row 2
    flat_rows = torch.arange(batch).repeat_interleave(length)
    trace_rows, trace_layers = torch.zeros(batch, experts + 1), torch.zeros(num_layers, experts + 1)
    count_decisions(choices, valid, flat_rows, trace_rows, trace_layers)
    rows, layers = reference_counts(choices, valid, flat_rows, batch, experts)
    assert trace_rows.tolist() == rows and trace_layers.tolist() == layers
    assert trace_rows[:, -1].sum() > 0 and trace_rows[:, :-1].sum() > 0, "the case needs base and expert decisions"
    # counting adds: a second call doubles every count
    count_decisions(choices, valid, flat_rows, trace_rows, trace_layers)
    assert trace_rows.tolist() == [[2 * c for c in row] for row in rows]


def test_count_decisions_without_routed_layers_adds_nothing() -> None:
    rows, layers = torch.ones(2, 3), torch.ones(2, 3)
    count_decisions([], torch.ones(4), torch.tensor([0, 0, 1, 1]), rows, layers)
    assert rows.tolist() == [[1, 1, 1]] * 2 and layers.tolist() == [[1, 1, 1]] * 2


def test_trace_reads_counts_by_route_name_base_last() -> None:
    trace = RoutingTrace(("math", "code"), torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 2.0]]), torch.tensor([[3, 2, 3]]))
    assert trace.row_counts() == [{"math": 3, "code": 0, "base": 1}, {"math": 0, "code": 2, "base": 2}]
    assert trace.layer_counts() == [{"math": 3, "code": 2, "base": 3}]
    assert [list(r) for r in trace.row_counts()] == [["math", "code", "base"]] * 2


@pytest.mark.parametrize(
    ("counts", "shares"),
    [
        ({"math": 3, "code": 1, "base": 4}, {"math": 0.375, "code": 0.125, "base": 0.5}),
        ({"math": 2, "code": 0, "base": 0}, {"math": 1.0, "code": 0.0, "base": 0.0}),  # zero counts keep their key
        ({"math": 5}, {"math": 1.0, "base": 0.0}),  # base is always present
        ({"base": 7}, {"base": 1.0}),
        ({"math": 0, "base": 0}, {"base": 1.0}),  # no decisions at all: everything was base
        ({}, {}),
    ],
)
def test_route_shares(counts: dict, shares: dict) -> None:
    got = route_shares(counts)
    assert got == pytest.approx(shares) and list(got) == list(shares), "experts in order, base last"
    if got:
        assert sum(got.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("shares", "bits"),
    [
        ({"base": 1.0}, 0.0),
        ({"math": 0.0, "code": 0.0, "base": 1.0}, 0.0),  # zero shares add nothing
        ({"math": 0.5, "base": 0.5}, 1.0),
        ({"a": 0.25, "b": 0.25, "c": 0.25, "base": 0.25}, 2.0),
        ({"math": 0.75, "base": 0.25}, -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))),
        ({}, 0.0),
    ],
)
def test_routing_entropy(shares: dict, bits: float) -> None:
    assert routing_entropy(shares) == pytest.approx(bits)


def test_add_counts_sums_route_by_route() -> None:
    total = {"math": 1.0, "base": 2.0}
    assert add_counts(total, {"math": 2.0, "code": 1.0, "base": 0.0}) is total
    assert total == {"math": 3.0, "base": 2.0, "code": 1.0}
