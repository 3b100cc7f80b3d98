"""Loss-free load balancing: nudge each gate's offset toward its target load, no auxiliary loss.

After each batch, for every (layer, expert) gate whose observed load differs from its target:

    offset += u * sign(target_load - observed_load)            (u ~ 1e-3)

An expert that wins fewer tokens than its share raises its score a little, one that wins more lowers it.
The update never touches weights or scores of other experts (scores are not normalised across experts;
see moe.routing.router), and it is the bias-only rule that worked best in the research we follow: balancing losses
cost 11-27%. The rule can open a gate beyond what its threshold allows on base-domain data, so callers
clamp the result with `clamp_offsets` to a per-gate ceiling measured on calibration text.
"""

from __future__ import annotations

import torch


def loss_free_update(
    offsets: torch.Tensor, observed_load: torch.Tensor, target_load: torch.Tensor, rate: float = 1e-3
) -> torch.Tensor:
    """New offsets (same shape as all three inputs, e.g. [L] or [L, E]); loads are shares in [0, 1].

    Equals, element by element: offsets[i] + rate * sign(target_load[i] - observed_load[i]).
    """
    if rate < 0:
        raise ValueError(f"balancing rate must be >= 0, got {rate}")
    return offsets + rate * torch.sign(target_load - observed_load).to(offsets.dtype)


def clamp_offsets(offsets: torch.Tensor, ceiling: torch.Tensor) -> torch.Tensor:
    """offsets no higher than ceiling (elementwise): the largest offset that keeps a gate's false-positive
    rate on base-domain tokens within its cap (see experts.train.offset_ceiling)."""
    return torch.minimum(offsets, ceiling.to(offsets.dtype))
