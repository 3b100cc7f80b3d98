"""The bottleneck expert kind: a small adapter run in parallel with a layer's frozen MLP block.

    mlp_out(x) = mlp(x) + up(gelu(down(x)))          down: hidden -> rank, up: rank -> hidden

`up` starts at zero (as litgpt's LoRA does), so a fresh expert changes nothing until trained. The same code
serves every family, since it only needs the MLP block's input and output.

The pieces (the kind protocol, moe.adapters.kind.AdapterKind, in the order a plug and a forward use them):
    BottleneckAdapter   an expert's weights: down [Lx, H, r], up [Lx, r, H]
    Bottleneck          the kind: its expert-file fields (`down`, `up`; shapes from the metadata's rank), its fit
                        check, its slot storage
    BottleneckSlots     the live slot storage: down [L, H, C, R], up [L, C, R, H], the only copy of each plugged
                        expert's weights (AdapterReferences: a training set's, by reference to the experts' tensors)
    BottleneckLayout    what a snapshot reads: the adapters by (layer, slot) for grouped dispatch, and the storage
                        per layer for the fixed-op decode path
    dispatch            per-token choices into batched adapter work (below)

Dispatch semantics (what `grouped_dispatch` computes; moe.adapters.reference.reference_dispatch spells it out):

    out = base.clone()
    for n in range(N):
        chosen = [e for e in choice[n] if e >= 0]
        for e in chosen:
            out[n] += adapter_e(x[n]) / len(chosen)

`slot_dispatch` is the decode form (top-1, slot storage, no host read); `routed_rows_dispatch` is the same after one
host read (eager decode on CPU): nothing when no row routed, else the slots that won rows as one adapter over their
range of the storage when they are adjacent, else per slot on just its rows. The grouped form sorts routed
(token, slot) pairs by expert and runs each expert that won tokens once, on just its tokens (index_select, two
small matmuls, index_add_). Base-route tokens are never touched, and experts that won nothing cost nothing, so
the cost grows with the routed tokens and k, not with the number of experts plugged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moe.adapters.dispatch import AfterBlock
from moe.model.backbone import BackboneFingerprint

NAME = "bottleneck"
# routed_rows_dispatch runs the slots that won rows as one adapter when they lie within this many adjacent slots
# (two matmuls over every row, as many ops as one slot: the demo set's two experts); else slot by slot up to
# PER_SLOT_MAX slots with rows (~5 small ops each), slot_dispatch above
DENSE_RANGE_MAX = 2
PER_SLOT_MAX = 2


def adapter_delta(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The adapter's contribution for tokens x: [N, H], down: [H, r], up: [r, H] -> [N, H]."""
    return F.gelu(x @ down) @ up


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


# --- an expert's adapter ----------------------------------------------------------------------------------


@dataclass
class BottleneckAdapter:
    """The bottleneck kind: down [Lx, H, r], up [Lx, r, H], added beside the MLP block (see the module doc)."""

    down: torch.Tensor
    up: torch.Tensor
    kind: ClassVar[str] = NAME
    routes_before_attention: ClassVar[bool] = False  # beside the MLP block: decided at its input

    @property
    def rank(self) -> int:
        return int(self.down.shape[2])

    @property
    def num_layers(self) -> int:
        return int(self.down.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"down": self.down, "up": self.up}

    def to(self, device: torch.device | str, dtype: torch.dtype) -> BottleneckAdapter:
        return BottleneckAdapter(self.down.detach().to(device, dtype), self.up.detach().to(device, dtype))

    def weightless(self) -> BottleneckAdapter:
        """Shapes and dtypes only: tensors on the meta device."""
        return BottleneckAdapter(_meta(self.down), _meta(self.up))

    def check(self, layers: int, hidden: int) -> None:
        """Internal invariant (files are validated with specific errors before an Expert is built)."""
        assert self.down.shape[:2] == (layers, hidden), self.down.shape
        assert self.up.shape == (layers, self.rank, hidden), self.up.shape

    @classmethod
    def fresh(
        cls, layers: int, hidden: int, rank: int, generator: torch.Generator | None, init_scale: float | None
    ) -> BottleneckAdapter:
        """Untrained: `down` random (scale hidden**-0.5 unless given), `up` zero, so it changes nothing."""
        scale = init_scale if init_scale is not None else hidden**-0.5
        down = torch.randn(layers, hidden, rank, generator=generator) * scale
        return cls(down, torch.zeros(layers, rank, hidden))


@dataclass(frozen=True)
class LayerAdapter:
    """One expert's adapter weights on one layer: down [H, r], up [r, H]."""

    down: torch.Tensor
    up: torch.Tensor


# --- the kind: file fields, fit, storage ------------------------------------------------------------------


class Bottleneck:
    """The bottleneck kind (moe.adapters.kind.AdapterKind)."""

    name = NAME
    adapter = BottleneckAdapter
    shape_source = "rank"  # what its file's tensor shapes follow (error text)
    weight_names = "down, up"

    # --- the expert file: `down` [Lx, H, r], `up` [Lx, r, H]; no metadata beyond the common fields ---

    def file_fields(self, adapter: BottleneckAdapter) -> dict[str, str]:
        return {}

    def parse_fields(self, metadata: Mapping[str, str]) -> None:
        return None

    def check_rank(self, rank: int, fields: None) -> None:
        return None

    def file_shapes(
        self, fields: None, layers: int, rank: int, backbone: BackboneFingerprint
    ) -> dict[str, tuple[int, ...]]:
        hidden = backbone.hidden_size
        return {"down": (layers, hidden, rank), "up": (layers, rank, hidden)}

    def is_float32(self, tensor_name: str) -> bool:
        return False

    def from_tensors(self, tensors: Mapping[str, torch.Tensor], fields: None) -> BottleneckAdapter:
        return BottleneckAdapter(tensors["down"], tensors["up"])

    # --- the backbone ---

    def check_fits(
        self, name: str, adapter: BottleneckAdapter, projections: Mapping[str, tuple[int, int]] | None
    ) -> None:
        """Nothing beyond the hidden size and layers every kind is checked on: it reads the block's input and output."""

    def wrap_block(self, block: nn.Module, projections: Sequence[str], context: object) -> None:
        """Nothing to wrap: the delta is added to the block's output (moe.model.routed.RoutedMLP)."""

    # --- slot storage ---

    def slot_rank(self, adapter: BottleneckAdapter) -> int:
        """The width its slot storage needs for this expert (the storage grows to it: moe.adapters.slots)."""
        return adapter.rank

    def slots(
        self, num_layers: int, hidden: int, capacity: int, rank: int, device: torch.device, dtype: torch.dtype
    ) -> BottleneckSlots:
        return BottleneckSlots(num_layers, hidden, capacity, rank, device, dtype)

    def references(
        self, num_layers: int, hidden: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> AdapterReferences:
        return AdapterReferences(num_layers, capacity)


BOTTLENECK = Bottleneck()


@dataclass(frozen=True, eq=False)
class BottleneckLayout:
    """The bottleneck experts of a snapshot (moe.adapters.dispatch.KindLayout).

    adapters[l][c]  LayerAdapter or None: views of the slot storage (or the experts' own tensors, for a set built
                    from experts: gradients flow)
    down [L, H, C, R], up [L, C, R, H]  the slot storage (None for a set built from experts); zero in the slot of
                    another kind's expert
    """

    adapters: tuple[Sequence[LayerAdapter | None], ...]
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None

    @property
    def in_block(self) -> None:
        return None

    @property
    def after_block(self) -> AfterBlock:
        return AfterBlock(grouped_dispatch, self.adapters)

    @property
    def fixed(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...] | None:
        if self.down is None or self.up is None:
            return None
        return tuple((self.down[layer], self.up[layer]) for layer in range(self.down.shape[0]))


class BottleneckSlots:
    """The bottleneck adapters' weights, one slot per expert: down [L, H, C, R], up [L, C, R, H].

    down is laid out [L, H, C * R] so the dense decode path runs every slot as one [H, C*R] matmul; a slot's
    [H, r] block is down[l, :, c, :r]. Ranks are zero-padded to R (exact: gelu(0) = 0). ranks[c]: the rank of
    the bottleneck expert in slot c, 0 for a free slot or another kind's expert (host).
    """

    def __init__(
        self, num_layers: int, hidden: int, capacity: int, rank: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.num_layers, self.hidden, self.device, self.dtype = num_layers, hidden, device, dtype
        self.down = torch.zeros(num_layers, hidden, capacity, rank, device=device, dtype=dtype)
        self.up = torch.zeros(num_layers, capacity, rank, hidden, device=device, dtype=dtype)
        self.ranks: list[int] = [0] * capacity

    def resize(self, capacity: int, rank: int) -> None:
        self.ranks.extend([0] * (capacity - len(self.ranks)))
        old_down, old_up = self.down, self.up
        c, r = old_up.shape[1], old_up.shape[2]
        self.down = torch.zeros(self.num_layers, self.hidden, capacity, rank, device=self.device, dtype=self.dtype)
        self.up = torch.zeros(self.num_layers, capacity, rank, self.hidden, device=self.device, dtype=self.dtype)
        self.down[:, :, :c, :r] = old_down
        self.up[:, :c, :r] = old_up

    @torch.no_grad()
    def write(self, slot: int, layers: Sequence[int], adapter: object) -> None:
        """The adapter into `slot` (its layers by position), every other layer zeroed (every layer, for another
        kind's adapter: its weights live in that kind's storage)."""
        self.down[:, :, slot].zero_()
        self.up[:, slot].zero_()
        self.ranks[slot] = 0
        if not isinstance(adapter, BottleneckAdapter):
            return
        self.ranks[slot] = adapter.rank
        index = torch.tensor(list(layers), dtype=torch.long, device=self.device)
        r = adapter.rank
        self.down[index, :, slot, :r] = adapter.down.detach().to(self.device, self.dtype)  # [Lx, H, r]
        self.up[index, slot, :r] = adapter.up.detach().to(self.device, self.dtype)  # [Lx, r, H]

    def forget(self, slot: int) -> None:
        """The slot holds no expert (its gate is disabled; the weights stay unread until it is written again)."""
        self.ranks[slot] = 0

    def read(self, slot: int, layers: Sequence[int], handle: BottleneckAdapter) -> BottleneckAdapter:
        """The slot's adapter copied back out: down [Lx, H, r], up [Lx, r, H]."""
        index = torch.tensor(list(layers), dtype=torch.long, device=self.device)
        r = handle.rank
        return BottleneckAdapter(self.down[index, :, slot, :r].clone(), self.up[index, slot, :r].clone())

    def layout(self, covered: Sequence[frozenset[int]], live: bool) -> BottleneckLayout:
        """Views of the storage; covered[c]: the layers slot c's expert covers. live: the views read the host facts
        as they change (the live set follows later plugs); else a copy of them as they are (a snapshot's)."""
        ranks = self.ranks if live else tuple(self.ranks)
        adapters = tuple(
            _SlotViews(self.down[layer], self.up[layer], layer, ranks, covered) for layer in range(self.num_layers)
        )
        return BottleneckLayout(adapters, self.down, self.up)

    def nbytes(self) -> int:
        return self.down.numel() * self.down.element_size() + self.up.numel() * self.up.element_size()


class _SlotViews(Sequence):
    """One layer's adapters by slot, as views into the slot storage (made when grouped dispatch asks)."""

    def __init__(
        self,
        down: torch.Tensor,
        up: torch.Tensor,
        layer: int,
        ranks: Sequence[int],
        covered: Sequence[frozenset[int]],
    ) -> None:
        self._down, self._up, self._layer, self._ranks, self._covered = down, up, layer, ranks, covered

    def __len__(self) -> int:
        return len(self._ranks)

    def __getitem__(self, slot: int) -> LayerAdapter | None:  # type: ignore[override]
        if self._layer not in self._covered[slot] or not self._ranks[slot]:
            return None  # the slot skips the layer, or holds another kind's expert (rank 0 here)
        r = self._ranks[slot]
        return LayerAdapter(self._down[:, slot, :r], self._up[slot, :r])  # [H, r], [r, H]


class AdapterReferences:
    """Adapters by reference to the experts' own tensors (no copy): training sets, whose leaves need gradients."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        self.table: list[list[LayerAdapter | None]] = [[None] * capacity for _ in range(num_layers)]

    def resize(self, capacity: int, rank: int) -> None:
        for row in self.table:
            row.extend([None] * (capacity - len(row)))

    def write(self, slot: int, layers: Sequence[int], adapter: object) -> None:
        for row in self.table:
            row[slot] = None
        if not isinstance(adapter, BottleneckAdapter):
            return
        with torch.enable_grad():  # views of leaves that require grad keep their path back to them
            for i, layer in enumerate(layers):
                self.table[layer][slot] = LayerAdapter(adapter.down[i], adapter.up[i])

    def forget(self, slot: int) -> None:
        """Nothing to do: a freed slot's gate is disabled (its entries are replaced when the slot is written)."""

    def read(self, slot: int, layers: Sequence[int], handle: BottleneckAdapter) -> BottleneckAdapter:
        return handle  # the expert's own tensors

    def layout(self, covered: Sequence[frozenset[int]], live: bool) -> BottleneckLayout:
        return BottleneckLayout(tuple(tuple(row) for row in self.table))

    def nbytes(self) -> int:
        return 0


# --- dispatch -----------------------------------------------------------------------------------------------


def grouped_dispatch(
    x: torch.Tensor,
    base: torch.Tensor,
    choice: torch.Tensor,
    adapters: Sequence[LayerAdapter | None],
    chosen: torch.Tensor | None = None,
) -> torch.Tensor:
    """x, base [N, H]; choice [N, k] expert indices or -1; adapters[e] for this layer -> out [N, H].

    chosen [N]: how many experts each token chose, counting other kinds' choices that were emptied from
    `choice` (the 1/len(chosen) weight); None: counted from `choice`.
    """
    if choice.shape[1] == 1:
        return _grouped_top1(x, base, choice[:, 0], adapters)
    valid = choice >= 0
    tokens, slots = valid.nonzero(as_tuple=True)  # one host sync per layer, only when something routes
    if tokens.numel() == 0:
        return base
    experts = choice[tokens, slots]
    order = torch.argsort(experts, stable=True)
    tokens, experts = tokens[order], experts[order]
    won, counts = torch.unique_consecutive(experts, return_counts=True)
    counts_per_token = valid.sum(dim=1) if chosen is None else chosen
    weights = (1.0 / counts_per_token.clamp(min=1)).to(base.dtype)[tokens, None]
    out = base.clone()
    start = 0
    for e, count in zip(won.tolist(), counts.tolist(), strict=True):
        rows = tokens[start : start + count]
        start += count
        adapter = adapters[e]
        assert adapter is not None, f"expert {e} chosen on a layer it does not cover"
        delta = adapter_delta(x.index_select(0, rows), adapter.down, adapter.up) * weights[start - count : start]
        out.index_add_(0, rows, delta.to(out.dtype))
    return out


def _grouped_top1(
    x: torch.Tensor,
    base: torch.Tensor,
    choice: torch.Tensor,
    adapters: Sequence[LayerAdapter | None],
    counts: list[int] | None = None,
) -> torch.Tensor:
    """Top-1 in few ops: one bincount read on the host (or `counts`, already read: [base, e0, e1, ...]), tokens
    sorted by expert (base first, skipped)."""
    if counts is None:
        counts = torch.bincount(choice + 1, minlength=len(adapters) + 1).tolist()
    if counts[0] == choice.shape[0]:
        return base
    order = torch.argsort(choice, stable=True)
    out = base.clone()
    start = counts[0]
    for e, count in enumerate(counts[1:]):
        if count == 0:
            continue
        rows = order[start : start + count]
        start += count
        adapter = adapters[e]
        assert adapter is not None, f"expert {e} chosen on a layer it does not cover"
        out.index_add_(0, rows, adapter_delta(x.index_select(0, rows), adapter.down, adapter.up).to(out.dtype))
    return out


class _StorageSlots(Sequence):
    """One layer's slot storage as adapters: slot c is views of down[:, c] [H, R] and up[c] [R, H] (padding zero)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor) -> None:
        self._down, self._up = down, up

    def __len__(self) -> int:
        return int(self._up.shape[0])

    def __getitem__(self, slot: int) -> LayerAdapter:  # type: ignore[override]
        return LayerAdapter(self._down[:, slot], self._up[slot])


def slot_dispatch(
    x: torch.Tensor, base: torch.Tensor, choice: torch.Tensor, down: torch.Tensor, up: torch.Tensor
) -> torch.Tensor:
    """Top-1 over slot storage with no host read and a fixed number of ops (decode; capture-safe).

    x, base [N, H]; choice [N] slot or -1 (base); down [H, C, R], up [C, R, H] (ranks zero-padded).
    Semantics: out[n] = base[n] + gelu(x[n] @ down[:, choice[n]]) @ up[choice[n]] where choice[n] >= 0,
    and base-route rows come back as `base` itself, bit for bit (torch.where picks base's values).

    Two forms, picked on the host from the shapes (documented rule, no data dependence):
      dense   when C <= N: every slot as one [H, C*R] and one [C*R, H] matmul, unchosen blocks zeroed
              (reads the slot weights once: C*H*R)
      gather  otherwise: each token's adapter gathered, two batched matmuls (copies N*H*R)
    """
    capacity = up.shape[0]
    if capacity == 0:
        return base
    delta = _dense_delta(x, choice, down, up) if capacity <= x.shape[0] else _gathered_delta(x, choice, down, up)
    return torch.where((choice >= 0)[:, None], base + delta.to(base.dtype), base)


def routed_rows_dispatch(
    x: torch.Tensor,
    base: torch.Tensor,
    choice: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    read: list[int] | None = None,
) -> torch.Tensor:
    """slot_dispatch's semantics with one host read (eager decode where a read costs no device sync, i.e. on
    CPU; a captured step cannot read), in as few ops as the read allows:

        nothing routed                         `base` itself (no adapter run)
        the slots that won rows span at most   their range of the storage run as one adapter over every row
          DENSE_RANGE_MAX adjacent slots       (`_range_delta`: two matmuls, no gather or scatter)
        else, at most PER_SLOT_MAX slots won   each once on just its rows (two plain matmuls over its slice)
        else                                   slot_dispatch (its fixed ops cost less than a run per slot)

    read: choice.tolist(), when the caller has read it already (it counts the decisions on the host); None: read
    here. The read is the choices themselves (no bincount: one op fewer and a plain list, ~16 ints a decode step).
    choice may be None when read is given (a caller that decided on the host): it is made from the read only on
    the paths that index with it. Base-route rows come back with base's values, bit for bit, and base is never
    written in place."""
    if read is None:
        assert choice is not None
        read = choice.tolist()
    won = sorted({slot for slot in read if slot >= 0})
    if not won:
        return base
    first, last = won[0], won[-1]
    if last - first < DENSE_RANGE_MAX:
        return _range_delta(x, base, read, down, up, first, last + 1)
    if choice is None:
        choice = torch.tensor(read, device=x.device)
    if len(won) > PER_SLOT_MAX:
        return slot_dispatch(x, base, choice, down, up)
    counts = [0] * (up.shape[0] + 1)  # [base, slot 0, ...], as bincount(choice + 1) gives them
    for slot in read:
        counts[slot + 1] += 1
    return _grouped_top1(x, base, choice, _StorageSlots(down, up), counts)


def _range_views(down: torch.Tensor, up: torch.Tensor, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """down [H, C, R], up [C, R, H] -> (down[:, first:end] as [H, k*R], up[first:end] as [k*R, H]), views made once
    per layer and range (four view ops a layer in a decode step otherwise). Kept on the `down` view itself (a set's
    `fixed[layer][0]`, the same object for as long as the set is kept, so they go with it), keyed by the range and
    checked against `up`."""
    views = down.__dict__.setdefault("_range_views", {})  # {(first, end): (up, down's view, up's view)}
    kept = views.get((first, end))
    if kept is not None and kept[0] is up:
        return kept[1], kept[2]
    hidden, capacity, rank = down.shape
    start, width = first * rank, (end - first) * rank
    down_range = down.reshape(hidden, capacity * rank)[:, start : start + width]
    up_range = up.reshape(capacity * rank, -1)[start : start + width]
    views[first, end] = (up, down_range, up_range)
    return down_range, up_range


def _range_delta(
    x: torch.Tensor,
    base: torch.Tensor,
    read: list[int],
    down: torch.Tensor,
    up: torch.Tensor,
    first: int,
    end: int,
) -> torch.Tensor:
    """base + each routed row's adapter, for choices in slots first..end-1 (or -1) -> out [N, H], a new tensor.

    x, base [N, H]; read [N] the choices as read on the host; down [H, C, R], up [C, R, H] (one layer's storage).
    The range's blocks side by side are one adapter of rank k*R (k = end - first): down[:, first:end] is a strided
    [H, k*R] view, up[first:end] a contiguous [k*R, H] one, so nothing is copied. Semantics, per row n:

        h[n]   = gelu(x[n] @ down[:, first:end].flat)           # [k*R], every block of the range
        h[n]   = 0 outside block read[n] - first (all of it for a base row)
        out[n] = base[n] + h[n] @ up[first:end].flat

    masked_fill writes exact zeros whatever x holds, so a base row adds exact zeros (its values, bit for bit). The
    mask is made on the host from the read (a bool tensor over a bytearray: no kernel), none when every row chose
    slot `first`."""
    down_range, up_range = _range_views(down, up, first, end)
    h = F.gelu(torch.mm(x, down_range))  # [N, k*R]
    if any(slot != first for slot in read):
        blocks = range(first, end)
        drop = torch.frombuffer(bytearray(slot != block for slot in read for block in blocks), dtype=torch.bool)
        if x.device.type != "cpu":
            drop = drop.to(x.device)
        h.view(-1, end - first, down.shape[2]).masked_fill_(drop.view(-1, end - first, 1), 0.0)
    return torch.addmm(base, h, up_range)


def _gathered_delta(x: torch.Tensor, choice: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    index = choice.clamp(min=0)
    chosen_down = down.index_select(1, index).permute(1, 0, 2)  # [N, H, R]
    chosen_up = up.index_select(0, index)  # [N, R, H]
    return torch.bmm(F.gelu(torch.bmm(x[:, None], chosen_down)), chosen_up)[:, 0]  # [N, H]


def _dense_delta(x: torch.Tensor, choice: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    hidden, capacity, rank = down.shape
    h = F.gelu(x @ down.reshape(hidden, capacity * rank)).view(-1, capacity, rank)  # [N, C, R]
    keep = torch.arange(capacity, device=x.device) == choice[:, None]  # [N, C], all False for base rows
    h = h * keep[:, :, None].to(h.dtype)
    return h.view(-1, capacity * rank) @ up.reshape(capacity * rank, -1)  # [N, H]
