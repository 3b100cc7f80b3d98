"""What an adapter kind provides, and the table of kinds (PEFT's `tuners/<kind>/` habit: the shared code never
asks which kind it holds; a new kind is one module plus one line in `KINDS`).

A kind is one module (moe.adapters.bottleneck, moe.adapters.lora) holding:
    its adapter     a dataclass an Expert carries (`Adapter`): its tensors by file name, to(), rank, num_layers,
                    a weightless (meta) copy, and its shape invariant
    its kind object (`AdapterKind`, one instance in KINDS): the expert-file fields (metadata in and out, tensor
                    shapes from the metadata, which tensors are float32), its fit check against the backbone, the
                    hook that wraps a block's modules it runs in, and its slot storage
    its storage     (`KindSlots`): allocate, resize, write, forget, read, nbytes, and its layout for a snapshot
                    (moe.adapters.dispatch.KindLayout: how a layer's choice runs it, in or after the block)
and, for tests, its plain per-token oracle in moe.adapters.reference.

Everything else goes through this table: moe.adapters.file (reading and writing the kind's fields),
moe.adapters.slots (one storage per kind, one layout per kind in a snapshot), moe.model.routed (each kind's
block hook; the stages a snapshot resolved). Nothing outside the kind modules asks which kind an expert is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from moe.adapters.bottleneck import BOTTLENECK
from moe.adapters.dispatch import KindLayout
from moe.adapters.lora import LORA
from moe.model.backbone import BackboneFingerprint


@runtime_checkable
class Adapter(Protocol):
    """An expert's adapter over the layers it covers (Lx), tensors indexed by position in the expert's layers."""

    kind: str  # the name of its kind (a key of KINDS), and the expert file's `kind`

    @property
    def rank(self) -> int: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def routes_before_attention(self) -> bool:
        """It changes attention: its gate reads the attention block's input and its decision is taken there
        (moe.model.routed.RoutedAttention); False: at the MLP input."""
        ...

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, by its name in the expert file."""
        ...

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Adapter: ...

    def weightless(self) -> Adapter:
        """The same shapes and dtypes with tensors on the meta device (a plugged expert's handle)."""
        ...

    def check(self, layers: int, hidden: int) -> None:
        """Internal invariant: its shapes agree with Lx = layers (files are validated before an Expert is built)."""
        ...


@runtime_checkable
class KindSlots(Protocol):
    """One kind's slot storage (C slots, shared with the gates: a slot holds one expert of some kind)."""

    def resize(self, capacity: int, rank: int) -> None:
        """Grow to `capacity` slots (and `rank`, where the kind pads slots to one rank), copying what is there."""
        ...

    def write(self, slot: int, layers: Sequence[int], adapter: Adapter) -> None:
        """Clear the slot, then write the adapter into it when it is of this kind (layers by position)."""
        ...

    def forget(self, slot: int) -> None:
        """The slot holds no expert any more (unplugged)."""
        ...

    def read(self, slot: int, layers: Sequence[int], handle: Adapter) -> Adapter:
        """The slot's adapter copied back out (`handle`: the plugged expert's weightless adapter)."""
        ...

    def layout(self, covered: Sequence[frozenset[int]], live: bool) -> KindLayout | None:
        """The storage laid out for a forward; covered[c]: the layers slot c's expert covers. live: follow later
        plugs (the live set) rather than copy the host facts (a snapshot). None when it holds nothing to run."""
        ...

    def nbytes(self) -> int: ...


@runtime_checkable
class AdapterKind(Protocol):
    """One adapter kind (see the module doc)."""

    name: str  # the expert file's `kind`
    adapter: type  # its Adapter dataclass
    shape_source: str  # what its file's tensor shapes follow, for error text ("rank", "lora targets")
    weight_names: str  # its weight tensors, for error text ("down, up")

    # --- the expert file ---
    def file_fields(self, adapter: Adapter) -> dict[str, str]:
        """The metadata fields of this kind beyond the common ones (strings; structured ones JSON)."""
        ...

    def parse_fields(self, metadata: Mapping[str, str]) -> object:
        """Those fields parsed and checked (InvalidMetadataError naming what is wrong), for the calls below."""
        ...

    def check_rank(self, rank: int, fields: object) -> None:
        """The common `rank` field against this kind's fields."""
        ...

    def file_shapes(
        self, fields: object, layers: int, rank: int, backbone: BackboneFingerprint
    ) -> dict[str, tuple[int, ...]]:
        """Every adapter tensor's shape, from the metadata (the first one's dtype is the file's weight dtype)."""
        ...

    def is_float32(self, tensor_name: str) -> bool:
        """The tensor is a compared or scalar value (always float32 in the file), not a weight."""
        ...

    def from_tensors(self, tensors: Mapping[str, torch.Tensor], fields: object) -> Adapter: ...

    # --- the backbone ---
    def check_fits(self, name: str, adapter: Adapter, projections: Mapping[str, tuple[int, int]] | None) -> None:
        """IncompatibleExpertError unless the adapter fits the backbone's MLP projections {name: (in, out)}
        (hidden size and layers are checked for every kind by moe.adapters.slots.check_fits)."""
        ...

    def wrap_block(self, block: nn.Module, projections: Sequence[str], context: object) -> None:
        """Wrap the modules of a block this kind runs inside (in place; weights untouched), reading the plan from
        `context.step.block_plan` (moe.model.routed); nothing for a kind run after the block. Called per layer
        with its MLP block and the MLP projections, then with the decoder layer and the attention targets
        (paths from the layer, `self_attn.q_proj`: moe.model.backbone.Family)."""
        ...

    # --- slot storage ---
    def slot_rank(self, adapter: Adapter) -> int:
        """The rank every kind's storage is asked to hold for this expert (0: none beyond its own)."""
        ...

    def slots(
        self, num_layers: int, hidden: int, capacity: int, rank: int, device: torch.device, dtype: torch.dtype
    ) -> KindSlots:
        """Slot storage: the only copy of the plugged experts' weights of this kind."""
        ...

    def references(
        self, num_layers: int, hidden: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> KindSlots:
        """Storage by reference to the experts' own tensors (sets built from experts: gradients reach them)."""
        ...


# The table: a kind's name (its expert files' `kind`) -> the kind. A new kind is its module and one line here.
KINDS: Mapping[str, AdapterKind] = {
    BOTTLENECK.name: BOTTLENECK,
    LORA.name: LORA,
}
