"""The router: each expert scored on its own, a threshold per expert, and a base route.

For a token with MLP input x on layer l, expert e scores

    score[e] = cos(x, key[l, e]) + offset[l, e]

and is eligible only when score[e] > threshold[l, e]. The top-k eligible experts win; a token with no
eligible expert takes the base route (the backbone's MLP alone, no expert work). Scores are never
normalised across experts (no softmax), so plugging an expert cannot change another's score: it can
only win tokens, and unplugging one sends its tokens to the next eligible expert or to base.

Routing modes, chosen per sequence:
    token     per token per layer (default)
    sequence  one expert, or base, chosen from the prompt and kept for the whole sequence
    pin       one named expert on every token of every layer it covers
    off       backbone only
An allow-list restricts which experts a token or sequence may use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from moe.adapters.expert import BASE_ROUTE
from moe.adapters.slots import PluggedSet
from moe.errors import RoutingSpecError

RoutingMode = Literal["token", "sequence", "pin", "off"]
MODES: tuple[str, ...] = get_args(RoutingMode)


@dataclass(frozen=True)
class RouterConfig:
    top_k: int = 1
    # sequence mode: the prompt's most-chosen expert wins the sequence when it took at least this share of
    # the prompt's (token, layer) decisions; otherwise the sequence stays on base.
    sequence_min_share: float = 0.25

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if not 0.0 < self.sequence_min_share <= 1.0:
            raise ValueError(f"sequence_min_share must be in (0, 1], got {self.sequence_min_share}")


@dataclass(frozen=True)
class RoutingSpec:
    """How one sequence is routed. For `sequence` mode, `expert` holds the decision once made."""

    mode: RoutingMode = "token"
    expert: str | None = None
    allow: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RoutingSpecError(f"routing mode {self.mode!r} is not one of {list(MODES)}")
        if self.mode == "pin" and not self.expert:
            raise RoutingSpecError("routing mode 'pin' needs an expert name")
        if self.mode in ("token", "off") and self.expert:
            raise RoutingSpecError(f"routing mode {self.mode!r} takes no expert; use mode 'pin' to force one")

    def check_against(self, plugged: PluggedSet) -> None:
        """Raise UnknownExpertError for a pinned or allowed name that is not plugged."""
        names = set(self.allow or ()) | ({self.expert} if self.expert and self.expert != BASE_ROUTE else set())
        for name in sorted(names):
            plugged.index(name)


@dataclass(frozen=True)
class StepRouting:
    """Per-row routing of one forward step, as tensors (B = batch rows, C = slots of the plugged set).

    allowed [B, C] bool     slots a row's tokens may win (all False: base only; a free slot is never
                            eligible, so token mode allows every column)
    forced  [B] long        slot a row is pinned to, -1 for none
    apply   [B] bool        False: score and trace the row but run no expert on it (sequence-mode
                            prompt scoring: its decisions are counted on the plain backbone)

    Host-side facts, decided from the specs so the model never reads device tensors to learn them:
    routes_anything     some row may use some expert (False: skip all routing work)
    all_token_mode      no pins and every expert allowed on every row (the router's fast path)
    applies_everywhere  no row is observe-only
    """

    allowed: torch.Tensor
    forced: torch.Tensor
    apply: torch.Tensor
    routes_anything: bool = True
    all_token_mode: bool = False
    applies_everywhere: bool = False

    @classmethod
    def from_specs(
        cls,
        specs: list[RoutingSpec],
        plugged: PluggedSet,
        observe: list[bool] | None = None,
    ) -> StepRouting:
        """Rows in `sequence` mode without a decision yet are scored like `token` mode; set observe[i] to
        trace them without applying experts (how the prompt decision is made). A name a spec refers to (its
        pinned expert, its allow-list) that is not plugged raises UnknownExpertError, as `check_against` does."""
        allowed = torch.zeros(len(specs), plugged.capacity, dtype=torch.bool)
        forced = torch.full((len(specs),), -1, dtype=torch.long)
        apply = torch.tensor([not o for o in observe] if observe else [True] * len(specs), dtype=torch.bool)
        for row, spec in enumerate(specs):
            # every name is looked up, used or not (an off row's allow-list too): plugged.index raises for one
            # that is not plugged
            allow = None if spec.allow is None else [plugged.index(name) for name in spec.allow]
            # only pin and sequence (once decided) specs name one; an empty name is none (as check_against reads it)
            pinned = spec.expert if spec.mode in ("pin", "sequence") and spec.expert else None
            slot = plugged.index(pinned) if pinned is not None and pinned != BASE_ROUTE else -1
            if spec.mode == "off" or pinned == BASE_ROUTE:
                continue
            if pinned is not None:
                forced[row] = slot
            elif allow is None:
                allowed[row] = True
            else:
                allowed[row, allow] = True
        device = plugged.keys.device
        return cls(
            allowed.to(device),
            forced.to(device),
            apply.to(device),
            routes_anything=bool(plugged.experts) and bool((allowed.any(1) | (forced >= 0)).any()),
            all_token_mode=bool((forced < 0).all()) and bool(allowed.all()),
            applies_everywhere=bool(apply.all()),
        )


def gate_scores(x_unit: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x_unit [N, H] unit-norm token inputs, keys [E, H] unit-norm, offsets [E] -> scores [N, E]."""
    return (x_unit @ keys.T).float() + offsets


def route_top1(
    x: torch.Tensor,
    keys: torch.Tensor,
    offsets: torch.Tensor,
    thresholds: torch.Tensor,
    covers: torch.Tensor,
    allowed: torch.Tensor | None,
    forced: torch.Tensor | None,
) -> torch.Tensor:
    """Top-1 in a fixed number of ops, no host read (the decode step; what a captured graph runs).

    x [N, H] token inputs (not normalised); keys [C, H] unit-norm; offsets, thresholds [C]; covers [C] bool;
    allowed [N, C] bool (None: all); forced [N] long (-1 none; None: no pins) -> choice [N], -1 = base.
    Equals choose_experts(gate_scores(normalize(x), keys, offsets), ..., top_k=1)[:, 0]:

        scores = cos(x, keys) + offsets                        # [N, C], one matmul
        best   = argmax over {c : scores > thresholds and allowed} else -1
        choice = forced where pinned (where it covers the layer, else -1), best otherwise
    """
    scores = gate_scores(torch.nn.functional.normalize(x, dim=-1), keys, offsets)  # [N, C] float32
    eligible = scores > thresholds if allowed is None else (scores > thresholds) & allowed
    best, choice = torch.where(eligible, scores, float("-inf")).max(dim=1)  # [N]
    choice = torch.where(best > float("-inf"), choice, -1)
    if forced is None:
        return choice
    pin = torch.where(covers[forced.clamp(min=0)], forced, -1)
    return torch.where(forced >= 0, pin, choice)


def choose_experts(
    scores: torch.Tensor,
    thresholds: torch.Tensor,
    allowed: torch.Tensor | None,
    forced: torch.Tensor | None,
    covers: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """Pick each token's experts. Returns choice [N, k] of expert indices, -1 for an empty slot.

    scores [N, E], thresholds [E], allowed [N, E] bool (None: all), forced [N] long (-1 none; None: no
    pins), covers [E] bool. A token with every slot empty takes the base route.
    """
    if top_k == 1 and allowed is None and forced is None:  # the common case in few ops: best eligible or base
        best, choice = torch.where(scores > thresholds, scores, float("-inf")).max(dim=1)
        return torch.where(best > float("-inf"), choice, -1)[:, None]
    if allowed is None:
        allowed = torch.ones_like(scores, dtype=torch.bool)
    if forced is None:
        forced = torch.full(scores.shape[:1], -1, dtype=torch.long, device=scores.device)
    k = min(top_k, scores.shape[1])
    eligible = (scores > thresholds) & allowed
    masked = scores.masked_fill(~eligible, float("-inf"))
    top_scores, choice = masked.topk(k, dim=1)  # [N, k]
    choice = choice.masked_fill(top_scores == float("-inf"), -1)
    # a pinned token takes its expert in slot 0 and nothing else, where the expert covers the layer
    pinned = forced >= 0
    pin_choice = torch.where(covers[forced.clamp(min=0)] & pinned, forced, torch.full_like(forced, -1))
    choice = torch.where(pinned[:, None], torch.full_like(choice, -1), choice)
    choice[:, 0] = torch.where(pinned, pin_choice, choice[:, 0])
    return choice


def decide_sequence(counts: dict[str, float], names: tuple[str, ...], min_share: float) -> str:
    """The route a `sequence`-mode request keeps, from its prompt's decision counts ({route: count}, as
    RoutingTrace.row_counts gives them): the most-chosen of `names` if it took at least `min_share`."""
    total = sum(counts.values())
    chosen = {name: counts.get(name, 0.0) for name in names}
    if total <= 0 or not chosen:
        return BASE_ROUTE
    best = max(chosen, key=chosen.__getitem__)
    return best if chosen[best] > 0 and chosen[best] / total >= min_share else BASE_ROUTE


__all__ = [
    "MODES",
    "RouterConfig",
    "RoutingMode",
    "RoutingSpec",
    "RoutingSpecError",
    "StepRouting",
    "choose_experts",
    "decide_sequence",
    "gate_scores",
    "route_top1",
]
