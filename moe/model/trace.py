"""The routing trace: how many (token, layer) decisions each route took, and what the counts mean.

Every routed forward counts its decisions on the device (no host read per layer) and hands back a
RoutingTrace; the caller reads it once per step. Shares and entropy are defined here once, for the
server's responses and metrics and for the evaluation tables alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe.adapters.expert import BASE_ROUTE


@dataclass
class RoutingTrace:
    """(token, layer) routing decisions of one forward, counted on the device; read once per step.

    columns[c]: the expert in slot c (None: a free slot, which never wins a decision).
    rows [B, C + 1]: per sequence, decisions per slot, base last.
    layers [L, C + 1]: per layer, summed over the batch.
    """

    columns: tuple[str | None, ...]
    rows: torch.Tensor
    layers: torch.Tensor

    @property
    def names(self) -> tuple[str, ...]:
        """The plugged experts, in slot order."""
        return tuple(name for name in self.columns if name is not None)

    def row_counts(self) -> list[dict[str, float]]:
        """Per sequence {name: count, 'base': count}, one host read for the whole batch."""
        return counts_by_route(self.columns, self.rows.tolist())

    def layer_counts(self) -> list[dict[str, float]]:
        return counts_by_route(self.columns, self.layers.tolist())


def counts_by_route(columns: tuple[str | None, ...], table: list[list[float]]) -> list[dict[str, float]]:
    """Rows of [C + 1] counts (slots, then base) -> {name: count, ..., 'base': count}, free slots left out."""
    used = [(c, name) for c, name in enumerate(columns) if name is not None]
    return [{**{name: row[c] for c, name in used}, BASE_ROUTE: row[-1]} for row in table]


def count_decisions(
    choices: list[torch.Tensor],
    valid: torch.Tensor,
    flat_rows: torch.Tensor,
    trace_rows: torch.Tensor,
    trace_layers: torch.Tensor,
) -> None:
    """Add every layer's decisions to the trace in one go, on the device (no host read).

    choices: per routed layer [N, k] slot indices (-1 empty); valid [N] (0 for padding); flat_rows [N]
    the batch row of each token; trace_rows [B, C + 1] and trace_layers [L, C + 1] are added to in place.
    A token with every choice empty counts once for base (column C); a top-k token counts once per expert.
    """
    if not choices:
        return
    experts = trace_rows.shape[1] - 1
    choice = torch.stack(choices)  # [L, N, k]
    decided = choice >= 0
    weight = decided.to(trace_rows.dtype)
    weight[..., 0] += (~decided.any(dim=-1)).to(weight.dtype)  # base decisions land in slot 0's column
    weight *= valid[None, :, None]
    cols = torch.where(decided, choice, experts)  # base -> column E
    rows = flat_rows[None, :, None] * (experts + 1) + cols
    layers = torch.arange(choice.shape[0], device=choice.device)[:, None, None] * (experts + 1) + cols
    trace_rows.view(-1).scatter_add_(0, rows.reshape(-1), weight.reshape(-1))
    trace_layers.view(-1).scatter_add_(0, layers.reshape(-1), weight.reshape(-1))


def add_counts(total: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    """total += counts, route by route (in place; returns total)."""
    for route, count in counts.items():
        total[route] = total.get(route, 0.0) + count
    return total


def route_shares(counts: dict[str, float]) -> dict[str, float]:
    """Each route's fraction of the (token, layer) decisions, base always present ({} for no counts).

    Routes present with zero decisions keep their key (a share of 0), so a table can list every expert.
    """
    total = sum(counts.values())
    if total <= 0:
        return {BASE_ROUTE: 1.0} if counts else {}
    shares = {route: count / total for route, count in counts.items() if route != BASE_ROUTE}
    shares[BASE_ROUTE] = counts.get(BASE_ROUTE, 0.0) / total
    return shares


def routing_entropy(shares: dict[str, float]) -> float:
    """Entropy in bits of route shares (0: one route took everything)."""
    return max(0.0, -sum(p * math.log2(p) for p in shares.values() if p > 0))
