"""The loss-free balancing rule against its elementwise definition."""

from __future__ import annotations

import pytest
import torch

from moe.routing.balance import clamp_offsets, loss_free_update


@pytest.mark.parametrize(
    ("offsets", "observed", "target", "rate", "expected"),
    [
        ([0.0, 0.0, 0.0], [0.1, 0.5, 0.3], [0.3, 0.3, 0.3], 1e-3, [1e-3, -1e-3, 0.0]),
        ([0.2, -0.1], [0.0, 1.0], [1.0, 0.0], 0.05, [0.25, -0.15]),
        ([0.0], [0.3], [0.3], 1.0, [0.0]),
    ],
)
def test_update_equals_the_rule(offsets, observed, target, rate, expected) -> None:
    got = loss_free_update(torch.tensor(offsets), torch.tensor(observed), torch.tensor(target), rate)
    assert torch.allclose(got, torch.tensor(expected))


def test_update_matches_the_plain_loop_on_a_grid() -> None:
    g = torch.Generator().manual_seed(0)
    offsets, observed, target = (torch.rand(4, 3, generator=g) for _ in range(3))
    got = loss_free_update(offsets, observed, target, 1e-3)
    for i in range(4):
        for e in range(3):
            step = 1e-3 if target[i, e] > observed[i, e] else (-1e-3 if target[i, e] < observed[i, e] else 0.0)
            assert got[i, e].item() == pytest.approx(offsets[i, e].item() + step)
    assert torch.equal(offsets, offsets.clone())  # inputs untouched


def test_negative_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        loss_free_update(torch.zeros(1), torch.zeros(1), torch.ones(1), -1.0)


def test_clamp_keeps_offsets_under_their_ceiling() -> None:
    got = clamp_offsets(torch.tensor([0.3, -0.2, 0.05]), torch.tensor([0.1, 0.0, 0.1]))
    assert torch.equal(got, torch.tensor([0.1, -0.2, 0.05]))
