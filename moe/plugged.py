"""The plugged set: which experts are in, stacked for the router. Immutable; replaced whole.

Plugging builds a new PluggedSet from the old one plus the expert (copy-on-write) and the model swaps
its reference in one assignment. A forward step takes the reference once at its start, so it never
sees half an expert, and a set nobody references any more is freed with its experts' tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moe import lora
from moe.errors import ExpertNameTakenError, IncompatibleExpertError, UnknownExpertError
from moe.expert import Expert
from moe.lora import LoraStacks


@dataclass(frozen=True)
class LayerAdapter:
    """One expert's adapter weights on one layer: down [H, r], up [r, H]."""

    down: torch.Tensor
    up: torch.Tensor


@dataclass(frozen=True, eq=False)
class PluggedSet:
    """Experts in plug order, with their gates stacked per layer.

    Shapes (L = backbone layers, E = plugged experts of every kind, H = hidden):
        keys [L, E, H] unit-norm (zero where an expert skips a layer)
        offsets [L, E], thresholds [L, E] (+inf where an expert skips a layer: never eligible)
        covers [L, E] bool: the expert has an adapter on that layer (what a pin may use)
        adapters[l][e]: LayerAdapter of a bottleneck expert, or None (a LoRA expert, or a layer it skips);
            references the expert's own tensors: trainable
        down_stack [L, E, H, R], up_stack [L, E, R, H]: every bottleneck adapter padded to the largest rank R
            with zeros (exact: gelu(0) = 0; zero rows for LoRA experts), for the gathered decode path; a
            detached inference-only copy
        lora: the LoRA experts laid out for dispatch (moe.lora.LoraStacks), None when none is plugged
        projections: the backbone's MLP projections {name: (in, out)}, what a LoRA expert must fit (None: unchecked)
    """

    experts: tuple[Expert, ...]
    keys: torch.Tensor
    offsets: torch.Tensor
    thresholds: torch.Tensor
    covers: torch.Tensor
    adapters: tuple[tuple[LayerAdapter | None, ...], ...]
    down_stack: torch.Tensor
    up_stack: torch.Tensor
    version: int = 0
    # --- LoRA experts (moe.lora): the LoRA stacks per (layer, projection), and what they must fit ---
    lora: LoraStacks | None = None
    projections: Mapping[str, tuple[int, int]] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise UnknownExpertError(
                f"no expert named {name!r} is plugged; plugged: {list(self.names) or 'none'}"
            ) from None

    def get(self, name: str) -> Expert:
        return self.experts[self.index(name)]

    @property
    def has_bottleneck(self) -> bool:
        """Some plugged expert is of the bottleneck kind (its stacks have a rank): a host fact, no device read."""
        return self.down_stack.shape[-1] > 0

    @classmethod
    def empty(
        cls,
        num_layers: int,
        hidden_size: int,
        device: torch.device,
        dtype: torch.dtype,
        projections: Mapping[str, tuple[int, int]] | None = None,
    ) -> PluggedSet:
        return cls.build((), num_layers, hidden_size, device, dtype, version=0, projections=projections)

    @classmethod
    def build(
        cls,
        experts: tuple[Expert, ...],
        num_layers: int,
        hidden_size: int,
        device: torch.device,
        dtype: torch.dtype,
        version: int,
        projections: Mapping[str, tuple[int, int]] | None = None,
    ) -> PluggedSet:
        count = len(experts)
        keys = torch.zeros(num_layers, count, hidden_size, device=device, dtype=dtype)
        offsets = torch.zeros(num_layers, count, device=device)
        thresholds = torch.full((num_layers, count), float("inf"), device=device)
        covers = torch.zeros(num_layers, count, dtype=torch.bool, device=device)
        adapters: list[list[LayerAdapter | None]] = [[None] * count for _ in range(num_layers)]
        max_rank = max((expert.rank for expert in experts if expert.kind == "bottleneck"), default=0)
        down_stack = torch.zeros(num_layers, count, hidden_size, max_rank, device=device, dtype=dtype)
        up_stack = torch.zeros(num_layers, count, max_rank, hidden_size, device=device, dtype=dtype)
        for e, expert in enumerate(experts):
            bottleneck = expert.kind == "bottleneck"
            if bottleneck:
                with torch.no_grad():
                    for i, layer in enumerate(expert.layers):
                        down_stack[layer, e, :, : expert.rank] = expert.down[i]
                        up_stack[layer, e, : expert.rank] = expert.up[i]
            unit_keys = torch.nn.functional.normalize(expert.keys.float(), dim=-1).to(dtype)
            for i, layer in enumerate(expert.layers):
                keys[layer, e] = unit_keys[i]
                offsets[layer, e] = expert.offsets[i]
                thresholds[layer, e] = expert.thresholds[i]
                covers[layer, e] = True
                if bottleneck:
                    adapters[layer][e] = LayerAdapter(expert.down[i], expert.up[i])
        return cls(
            experts=experts,
            keys=keys,
            offsets=offsets,
            thresholds=thresholds,
            covers=covers,
            adapters=tuple(tuple(row) for row in adapters),
            down_stack=down_stack,
            up_stack=up_stack,
            version=version,
            lora=LoraStacks.build(experts, num_layers, device, dtype),
            projections=projections,
        )

    def _rebuild(self, experts: tuple[Expert, ...]) -> PluggedSet:
        num_layers, _, hidden = self.keys.shape
        return PluggedSet.build(
            experts, num_layers, hidden, self.keys.device, self.keys.dtype, self.version + 1, self.projections
        )

    def check_fits(self, expert: Expert) -> None:
        num_layers, _, hidden = self.keys.shape
        if expert.hidden_size != hidden:
            raise IncompatibleExpertError(
                f"expert {expert.name!r} has hidden size {expert.hidden_size}, the backbone has {hidden}"
            )
        bad = [layer for layer in expert.layers if not 0 <= layer < num_layers]
        if bad or len(set(expert.layers)) != len(expert.layers):
            raise IncompatibleExpertError(
                f"expert {expert.name!r} covers layers {list(expert.layers)}; the backbone has layers "
                f"0..{num_layers - 1} and each may appear once"
            )
        if expert.kind == lora.KIND:
            lora.check_fits(expert, self.projections)

    def plugging(self, expert: Expert, replace: bool = False) -> PluggedSet:
        """A new set with `expert` added (or swapped in place of the same name when replace)."""
        self.check_fits(expert)
        if expert.name in self.names:
            if not replace:
                raise ExpertNameTakenError(
                    f"an expert named {expert.name!r} is already plugged; unplug it first, pass replace, "
                    "or choose another name"
                )
            experts = tuple(expert if e.name == expert.name else e for e in self.experts)
        else:
            experts = (*self.experts, expert)
        return self._rebuild(experts)

    def replacing_all(self, experts: tuple[Expert, ...]) -> PluggedSet:
        """A new set of exactly these experts, in this order (a whole expert-set version at once)."""
        names = [expert.name for expert in experts]
        if len(set(names)) != len(names):
            raise ExpertNameTakenError(f"an expert set names an expert twice: {names}")
        for expert in experts:
            self.check_fits(expert)
        return self._rebuild(experts)

    def unplugging(self, name: str) -> PluggedSet:
        self.index(name)  # raises UnknownExpertError
        return self._rebuild(tuple(e for e in self.experts if e.name != name))
