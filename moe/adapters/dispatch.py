"""Dispatch: how a routed layer runs the adapter kinds of its plugged experts.

The router makes one decision per token per layer (moe.model.routed): choice [N, k], slot indices or -1 (base
route). It is taken at the MLP input (RoutedMLP), except for the experts an in-block kind says route before
attention (`InBlock.early`: LoRA experts with attention targets), which are decided at the attention block's input
(RoutedAttention; `BeforeAttention` holds that split per layer); a token they did not take is decided at the MLP
input among the rest. Each adapter kind then runs its experts' rows in one of two places:

    in the block   the kind's plan (`InBlock.plan`, made from the choice before the block runs) is read by the
                   block's own projections while it runs (LoRA: moe.adapters.lora); the plan takes the kind's
                   choices out, leaving the rest of the choice to the kinds after the block
    after the block  the kind adds its experts' deltas to the block's output (`AfterBlock.delta`: bottleneck,
                   moe.adapters.bottleneck), base rows untouched

Semantics with top-k > 1 (moe.adapters.reference.reference_mlp spells them out): a token that chose the
experts C (any kinds, k' = |C|) runs the block with each in-block expert at weight 1/k' and adds each after-block
expert's delta / k'; `chosen` [N] carries k' to the kinds after the block once an in-block kind has emptied
its choices (None: counted from the choice). For top-1 (the default) that is exactly the chosen expert.

A snapshot of the plugged set (moe.adapters.slots.PluggedSet) resolves these stages once, from each kind's
layout of its slot storage (`KindLayout`), for the kinds it holds experts of: a forward then runs plain calls
per layer, never a lookup in the kind table. The decode path's fixed-op form (moe.model.routed.routed_top1)
reads `KindLayout.fixed`: the per-layer operands of slot_dispatch (the bottleneck kind's); a set holding an
expert of a kind without one runs on the grouped path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True, eq=False)
class InBlock:
    """A kind run inside the block: plan(layer, choice [N, k], gather) -> (the plan the block's projections read
    while it runs, or None when no row of this kind routed; the choice with this kind's experts emptied).
    gather: top-1 for few rows without a gradient (no host read)."""

    plan: Callable[[int, torch.Tensor, bool], tuple[object | None, torch.Tensor]]
    on_layer: tuple[bool, ...]  # host fact per layer: some expert of this kind covers it
    early: torch.Tensor | None = None  # [C] bool: the slots decided before attention (their plan also runs in the
    #   attention block); None: none
    early_on_layer: tuple[bool, ...] = ()  # host fact per layer: some of those covers it


@dataclass(frozen=True, eq=False)
class BeforeAttention:
    """One layer's decision split between the attention input and the MLP input (resolved per snapshot from the
    in-block stages' `early` slots; C columns):

        thresholds, covers [C]             the early slots' (+inf / False elsewhere): what the attention input
                                           is scored against (pins to other slots find nothing here)
        late_thresholds, late_covers [C]   the other slots' (+inf / False on the early ones): what the MLP input
                                           is scored against, for the tokens no early slot took
        late_allowed [C] bool              not an early slot (the context router's classifier masks with it)
        plans                              the in-block stages' plan calls for the attention block's projections
    """

    thresholds: torch.Tensor
    covers: torch.Tensor
    late_thresholds: torch.Tensor
    late_covers: torch.Tensor
    late_allowed: torch.Tensor
    plans: tuple[Callable[[int, torch.Tensor, bool], tuple[object | None, torch.Tensor]], ...]


@dataclass(frozen=True, eq=False)
class AfterBlock:
    """A kind run after the block: delta(x [N, H], base [N, H], choice [N, k], layers[l], chosen [N] | None)
    -> out [N, H], base rows untouched (`base` itself when no row of this kind routed).

    own [C] bool: the slots holding this kind's experts, set by the snapshot only when experts of more than one
    kind run after the block (each stage then sees its own experts' choices, and chosen counts them all)."""

    delta: Callable[..., torch.Tensor]
    layers: Sequence[object]  # the kind's operand per layer (e.g. its adapters by slot)
    own: torch.Tensor | None = None


@runtime_checkable
class KindLayout(Protocol):
    """One kind's plugged experts laid out for a forward (views of its slot storage), made per snapshot."""

    @property
    def in_block(self) -> InBlock | None: ...

    @property
    def after_block(self) -> AfterBlock | None: ...

    @property
    def fixed(self) -> tuple[tuple[torch.Tensor, ...], ...] | None:
        """Per layer, the operands of the fixed-op decode dispatch (no host read; what a captured step runs),
        or None when the kind has no such form (or the set holds references, not slot storage)."""
        ...
