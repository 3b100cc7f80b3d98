"""A third adapter kind, for tests only: what adding a kind takes (this one module, plus one line in
moe.adapters.kind.KINDS and one in moe.adapters.reference.ORACLES; tests/moe/adapters/test_kind.py adds both).

The gain kind scales a layer's MLP input per hidden unit and adds it after the block:

    mlp_out(x) = mlp(x) + gain[l] * x          gain [Lx, H]

Its slot storage is one table [L, C, H]; it runs after the block (every routed row of it, weighted 1/k').
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from moe.adapters.dispatch import AfterBlock
from moe.model.backbone import BackboneFingerprint

NAME = "gain"


@dataclass
class GainAdapter:
    gain: torch.Tensor  # [Lx, H]
    kind: ClassVar[str] = NAME
    routes_before_attention: ClassVar[bool] = False

    @property
    def rank(self) -> int:
        return 1

    @property
    def num_layers(self) -> int:
        return int(self.gain.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"gain": self.gain}

    def to(self, device: torch.device | str, dtype: torch.dtype) -> GainAdapter:
        return GainAdapter(self.gain.detach().to(device, dtype))

    def weightless(self) -> GainAdapter:
        return GainAdapter(torch.empty(self.gain.shape, dtype=self.gain.dtype, device="meta"))

    def check(self, layers: int, hidden: int) -> None:
        assert self.gain.shape == (layers, hidden), self.gain.shape


def gain_delta(
    x: torch.Tensor, base: torch.Tensor, choice: torch.Tensor, table: torch.Tensor, chosen: torch.Tensor | None
) -> torch.Tensor:
    """x, base [N, H]; choice [N, k] (only this kind's slots, or -1); table [C, H] -> base + sum_e gain_e * x / k'."""
    weight = 1.0 / ((choice >= 0).sum(dim=1) if chosen is None else chosen).clamp(min=1)  # [N]
    out = base
    for j in range(choice.shape[1]):
        slot = choice[:, j]
        delta = x * table[slot.clamp(min=0)] * weight[:, None].to(x.dtype)
        out = torch.where((slot >= 0)[:, None], out + delta.to(out.dtype), out)
    return out


@dataclass(frozen=True, eq=False)
class GainLayout:
    table: torch.Tensor  # [L, C, H]

    @property
    def in_block(self) -> None:
        return None

    @property
    def after_block(self) -> AfterBlock:
        return AfterBlock(gain_delta, tuple(self.table[layer] for layer in range(self.table.shape[0])))

    @property
    def fixed(self) -> None:
        return None


class GainSlots:
    def __init__(self, num_layers: int, hidden: int, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.table = torch.zeros(num_layers, capacity, hidden, device=device, dtype=dtype)

    def resize(self, capacity: int, rank: int) -> None:
        table = self.table.new_zeros(self.table.shape[0], capacity, self.table.shape[2])
        table[:, : self.table.shape[1]] = self.table
        self.table = table

    @torch.no_grad()
    def write(self, slot: int, layers: Sequence[int], adapter: object) -> None:
        self.table[:, slot].zero_()
        if isinstance(adapter, GainAdapter):
            self.table[list(layers), slot] = adapter.gain.to(self.table.device, self.table.dtype)

    def forget(self, slot: int) -> None:
        pass  # a freed slot's gate is disabled; its row is replaced when the slot is written again

    def read(self, slot: int, layers: Sequence[int], handle: GainAdapter) -> GainAdapter:
        return GainAdapter(self.table[list(layers), slot].clone())

    def layout(self, covered: Sequence[frozenset[int]], live: bool) -> GainLayout:
        return GainLayout(self.table)

    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()


class Gain:
    name = NAME
    adapter = GainAdapter
    shape_source = "layers"
    weight_names = "gain"

    def file_fields(self, adapter: GainAdapter) -> dict[str, str]:
        return {}

    def parse_fields(self, metadata: Mapping[str, str]) -> None:
        return None

    def check_rank(self, rank: int, fields: None) -> None:
        return None

    def file_shapes(
        self, fields: None, layers: int, rank: int, backbone: BackboneFingerprint
    ) -> dict[str, tuple[int, ...]]:
        return {"gain": (layers, backbone.hidden_size)}

    def is_float32(self, tensor_name: str) -> bool:
        return False

    def from_tensors(self, tensors: Mapping[str, torch.Tensor], fields: None) -> GainAdapter:
        return GainAdapter(tensors["gain"])

    def check_fits(self, name: str, adapter: GainAdapter, projections: Mapping[str, tuple[int, int]] | None) -> None:
        pass  # it reads the block's input only

    def wrap_block(self, block: nn.Module, projections: Sequence[str], context: object) -> None:
        pass  # run after the block

    def slot_rank(self, adapter: GainAdapter) -> int:
        return 0

    def slots(
        self, num_layers: int, hidden: int, capacity: int, rank: int, device: torch.device, dtype: torch.dtype
    ) -> GainSlots:
        return GainSlots(num_layers, hidden, capacity, device, dtype)

    def references(
        self, num_layers: int, hidden: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> GainSlots:
        return GainSlots(num_layers, hidden, capacity, device, dtype)  # a copy: the toy kind is not trained


GAIN = Gain()


def oracle(adapter: GainAdapter, i: int, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One token's contribution, for moe.adapters.reference.ORACLES."""
    return {}, x[0] * adapter.gain[i]
