"""The plugged experts: preallocated slots written in place (`ExpertSlots`), and what a reader sees of them
(`PluggedSet`, an immutable snapshot).

ExpertSlots, the live storage (L = backbone layers, C = slot capacity, H = hidden, R = largest rank):

    keys        [L, C, H]     unit-norm gate keys (0 where a slot is free or skips the layer)
    offsets     [L, C] f32
    thresholds  [L, C] f32    +inf where a slot is free, disabled or skips the layer: never eligible
    covers      [L, C] bool   the slot has an adapter on that layer (what a pin may use)
    weights     one storage object per adapter kind:
                BottleneckSlots  down [L, H, C, R], up [L, C, R, H]: the only copy of each expert's weights,
                                 ranks zero-padded (exact: gelu(0) = 0)
                AdapterReferences  adapters[l][c] referencing the experts' own tensors (training sets:
                                 gradients reach the leaves), no copy and no stacked tensors
    lora_weights  moe.adapters.lora.LoraSlots (slot storage only): per MLP projection p,
                  a [L, C, R_p, in], b [L, C, out, R_p],
                  s [L, C]: the only copy of each LoRA expert's pairs

Plug and unplug cost one expert's slices, whatever the number plugged:
    plug:    take a free slot (the lowest; none free: double the capacity, or grow the rank, reallocating),
             write the expert's weights and keys into it while no step can choose it (thresholds +inf,
             covers False), then publish it by writing its thresholds and covers columns.
    unplug:  disable the slot first (thresholds +inf, covers False); the slot joins the free list once the
             steps already enqueued on the device are done (a CUDA event; at once on CPU).
Every write happens between steps on the stream the steps run on (the engine thread runs plugs between
steps), so a step - eager or a replayed CUDA graph - sees a whole expert or none of it. Growing reallocates
and bumps `generation`: captured decode graphs hold the old addresses and must be captured again.

A PluggedSet is what everything else reads: names in plug order, each expert's slot, and the tensors. Its
thresholds and covers are its own copy ([L, C], a few KB), so a plug after it was taken cannot make an
expert eligible for a forward running on it; its keys, offsets and weights are the live storage, reachable
only through those columns. (A slot freed by an unplug may be reused by a later plug: a set taken before
that unplug must not run a forward after that plug. The engine takes `model.plugged` each step.)
Experts in a set built from slots are weightless handles (shapes and metadata, tensors on the meta device);
`read(name)` copies an expert's weights back out of its slot.

LoRA experts (moe.adapters.lora) take a slot like any expert: their gate in the gate columns (their bottleneck columns
stay zero) and their pairs in the same slot of `lora_weights` (moe.adapters.lora.LoraSlots: per projection, written in
place, the only copy), so a LoRA plug too costs one expert's slices whatever the number plugged. A snapshot
carries `lora`, that storage laid out for dispatch as views (moe.adapters.lora.LoraStacks). While a LoRA expert is
plugged, decode steps take the grouped path and the fixed-slot decoder runs eagerly (moe.decode.generation). A set
built from experts (`PluggedSet.build`) builds its LoraStacks from the experts' own tensors instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moe.adapters import lora
from moe.adapters.expert import ADAPTER_KIND, BottleneckAdapter, Expert
from moe.adapters.lora import LoraAdapter, LoraPair, LoraSlots, LoraStacks
from moe.errors import ExpertNameTakenError, IncompatibleExpertError, UnknownExpertError

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 8


@dataclass(frozen=True)
class LayerAdapter:
    """One expert's adapter weights on one layer: down [H, r], up [r, H]."""

    down: torch.Tensor
    up: torch.Tensor


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def weightless(expert: Expert) -> Expert:
    """An expert's name, layers, shapes and metadata, with its tensors on the meta device (no memory)."""
    if is_bottleneck(expert):
        adapter: BottleneckAdapter | LoraAdapter = BottleneckAdapter(_meta(expert.down), _meta(expert.up))
    else:
        pairs = expert.adapter.pairs
        adapter = LoraAdapter({p: LoraPair(_meta(q.A), _meta(q.B), _meta(q.scaling)) for p, q in pairs.items()})
    return Expert(
        name=expert.name,
        layers=expert.layers,
        adapter=adapter,
        keys=_meta(expert.keys),
        offsets=_meta(expert.offsets),
        thresholds=_meta(expert.thresholds),
        description=expert.description,
        examples=expert.examples,
        metadata=dict(expert.metadata),
    )


def is_bottleneck(expert: Expert) -> bool:
    return expert.kind == ADAPTER_KIND


def check_fits(
    expert: Expert, num_layers: int, hidden: int, projections: Mapping[str, tuple[int, int]] | None = None
) -> None:
    """Raise IncompatibleExpertError unless the expert's hidden size and layers fit the backbone (and, for a
    LoRA expert, its projections fit the backbone's MLP projections {name: (in, out)})."""
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
        lora.check_fits(expert, projections)


# --- adapter weights, one storage object per adapter kind --------------------------------------------------


class BottleneckSlots:
    """The bottleneck adapters' weights, one slot per expert: down [L, H, C, R], up [L, C, R, H].

    down is laid out [L, H, C * R] so the dense decode path runs every slot as one [H, C*R] matmul; a slot's
    [H, r] block is down[l, :, c, :r].
    """

    def __init__(
        self, num_layers: int, hidden: int, capacity: int, rank: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.num_layers, self.hidden, self.device, self.dtype = num_layers, hidden, device, dtype
        self.down = torch.zeros(num_layers, hidden, capacity, rank, device=device, dtype=dtype)
        self.up = torch.zeros(num_layers, capacity, rank, hidden, device=device, dtype=dtype)

    def resize(self, capacity: int, rank: int) -> None:
        old_down, old_up = self.down, self.up
        c, r = old_up.shape[1], old_up.shape[2]
        self.down = torch.zeros(self.num_layers, self.hidden, capacity, rank, device=self.device, dtype=self.dtype)
        self.up = torch.zeros(self.num_layers, capacity, rank, self.hidden, device=self.device, dtype=self.dtype)
        self.down[:, :, :c, :r] = old_down
        self.up[:, :c, :r] = old_up

    @torch.no_grad()
    def write(self, slot: int, layers: torch.Tensor, expert: Expert) -> None:
        """The expert's adapters into `slot` (layers [Lx] long on the device), every other layer zeroed (every
        layer, for a LoRA expert: its weights live in moe.adapters.lora.LoraSlots)."""
        self.down[:, :, slot].zero_()
        self.up[:, slot].zero_()
        if not is_bottleneck(expert):
            return
        r = expert.rank
        self.down[layers, :, slot, :r] = expert.down.detach().to(self.device, self.dtype)  # [Lx, H, r]
        self.up[layers, slot, :r] = expert.up.detach().to(self.device, self.dtype)  # [Lx, r, H]

    def read(self, slot: int, layers: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(down [Lx, H, r], up [Lx, r, H]) copied out of the slot."""
        return self.down[layers, :, slot, :rank].clone(), self.up[layers, slot, :rank].clone()

    def layer_adapters(self, layer: int, ranks: Sequence[int], covered: Sequence[frozenset[int]]) -> _SlotViews:
        return _SlotViews(self.down[layer], self.up[layer], layer, ranks, covered)

    @property
    def stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.down, self.up

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
            return None  # the slot skips the layer, or holds a LoRA expert (rank 0 here)
        r = self._ranks[slot]
        return LayerAdapter(self._down[:, slot, :r], self._up[slot, :r])  # [H, r], [r, H]


class AdapterReferences:
    """Adapters by reference to the experts' own tensors (no copy): training sets, whose leaves need gradients."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        self.table: list[list[LayerAdapter | None]] = [[None] * capacity for _ in range(num_layers)]

    def resize(self, capacity: int, rank: int) -> None:
        for row in self.table:
            row.extend([None] * (capacity - len(row)))

    def write(self, slot: int, layers: torch.Tensor, expert: Expert) -> None:
        for row in self.table:
            row[slot] = None
        if not is_bottleneck(expert):
            return
        with torch.enable_grad():  # views of leaves that require grad keep their path back to them
            for i, layer in enumerate(expert.layers):
                self.table[layer][slot] = LayerAdapter(expert.down[i], expert.up[i])

    def layer_adapters(
        self, layer: int, ranks: Sequence[int], covered: Sequence[frozenset[int]]
    ) -> tuple[LayerAdapter | None, ...]:
        return tuple(self.table[layer])

    @property
    def stacks(self) -> tuple[None, None]:
        return None, None

    def nbytes(self) -> int:
        return 0


# --- the live storage ---------------------------------------------------------------------------------------


class ExpertSlots:
    """Preallocated expert slots, written in place (see the module docstring)."""

    def __init__(
        self,
        num_layers: int,
        hidden: int,
        device: torch.device,
        dtype: torch.dtype,
        capacity: int = DEFAULT_CAPACITY,
        rank: int = 0,
        references: bool = False,
        projections: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        self.num_layers, self.hidden, self.device, self.dtype = num_layers, hidden, torch.device(device), dtype
        self.rank = rank
        self.projections = projections  # the backbone's MLP projections {name: (in, out)}: what a LoRA must fit
        self.keys = torch.zeros(num_layers, capacity, hidden, device=device, dtype=dtype)
        self.offsets = torch.zeros(num_layers, capacity, device=device)
        self.thresholds = torch.full((num_layers, capacity), float("inf"), device=device)
        self.covers = torch.zeros(num_layers, capacity, dtype=torch.bool, device=device)
        self.weights: BottleneckSlots | AdapterReferences = (
            AdapterReferences(num_layers, capacity)
            if references
            else BottleneckSlots(num_layers, hidden, capacity, rank, self.device, dtype)
        )
        # LoRA experts' pairs, slot by slot (a reference set builds its LoraStacks from the experts instead)
        self.lora_weights = None if references else LoraSlots(num_layers, capacity, self.device, dtype)
        # host-side bookkeeping, per slot
        self.names: list[str | None] = [None] * capacity
        self.ranks: list[int] = [0] * capacity
        self.covered: list[frozenset[int]] = [frozenset()] * capacity
        self._free: list[int] = list(range(capacity))  # reusable now, lowest first
        self._pending: list[tuple[int, torch.cuda.Event | None]] = []  # disabled, steps may still read them
        self._slot_by_name: dict[str, int] = {}
        self._experts: list[Expert] = []  # plug order (weightless handles, or the experts for a reference set)
        self.version = 0  # bumped by every plug and unplug
        self.generation = 0  # bumped when the tensors are reallocated (capacity or rank grew)
        self._snapshot: PluggedSet | None = None
        self._live: PluggedSet | None = None
        self._live_generation = -1
        # a reference set's LoRA stacks, rebuilt when its LoRA experts or the capacity change, keyed by (capacity,
        # (slot, expert) of each LoRA expert)
        self._lora: LoraStacks | None = None
        self._lora_key: tuple = (0, ())
        self._lora_experts: tuple = ()
        self.has_lora = False  # some plugged expert is a LoRA expert

    @property
    def capacity(self) -> int:
        return len(self.names)

    @property
    def references(self) -> bool:
        return isinstance(self.weights, AdapterReferences)

    def check_fits(self, expert: Expert) -> None:
        check_fits(expert, self.num_layers, self.hidden, self.projections)

    def slot_of(self, name: str) -> int:
        try:
            return self._slot_by_name[name]
        except KeyError:
            plugged = [e.name for e in self._experts]
            raise UnknownExpertError(f"no expert named {name!r} is plugged; plugged: {plugged or 'none'}") from None

    # --- plug / unplug (between steps) -------------------------------------------------------------------

    def plug(self, expert: Expert, replace: bool = False) -> PluggedSet:
        """Write `expert` into a free slot and publish it; with replace, the expert of the same name is
        disabled in the same call and the new one keeps its place in plug order. Returns the new set."""
        self.check_fits(expert)
        old = self._slot_by_name.get(expert.name)
        if old is not None and not replace:
            raise ExpertNameTakenError(
                f"an expert named {expert.name!r} is already plugged; unplug it first, pass replace, "
                "or choose another name"
            )
        rank = expert.rank if is_bottleneck(expert) else 0  # the bottleneck storage's rank for this slot
        slot = self._take_slot(rank)
        layers = torch.tensor(expert.layers, dtype=torch.long, device=self.device)
        with torch.no_grad():
            # 1. weights and gate into a slot no step can choose (thresholds +inf, covers False)
            self.weights.write(slot, layers, expert)
            if self.lora_weights is not None:
                self.lora_weights.write(slot, expert)
            self.keys[:, slot].zero_()
            self.offsets[:, slot].zero_()
            unit = F.normalize(expert.keys.detach().float(), dim=-1).to(self.device, self.dtype)  # [Lx, H]
            self.keys[layers, slot] = unit
            self.offsets[layers, slot] = expert.offsets.detach().float().to(self.device)
            # 2. publish: the slot's thresholds and covers columns (the old expert's, on replace, go off first)
            if old is not None:
                self._disable(old)
            thresholds = torch.full((self.num_layers,), float("inf"))
            thresholds[list(expert.layers)] = expert.thresholds.detach().float().cpu()
            covers = torch.zeros(self.num_layers, dtype=torch.bool)
            covers[list(expert.layers)] = True
            self.thresholds[:, slot] = thresholds.to(self.device)
            self.covers[:, slot] = covers.to(self.device)
        handle = expert if self.references else weightless(expert)
        if old is not None:
            self._release(old)
        self.names[slot], self.ranks[slot], self.covered[slot] = expert.name, rank, frozenset(expert.layers)
        self._slot_by_name[expert.name] = slot
        if old is not None:
            self._experts = [handle if e.name == expert.name else e for e in self._experts]
        else:
            self._experts.append(handle)
        return self._changed()

    def unplug(self, name: str) -> Expert:
        """Disable the expert's slot (no step can choose it from now on); it is reused once steps already
        enqueued are done. Returns the expert (a weightless handle for slot storage)."""
        slot = self.slot_of(name)
        with torch.no_grad():
            self._disable(slot)
        self._release(slot)
        del self._slot_by_name[name]
        expert = next(e for e in self._experts if e.name == name)
        self._experts = [e for e in self._experts if e.name != name]
        self._changed()
        return expert

    def set_all(self, experts: Sequence[Expert]) -> PluggedSet:
        """Make the plugged experts exactly these, in this order (a whole expert-set version at once): experts
        not named leave, an expert that is already plugged (the same object as its handle) keeps its slot
        untouched, every other one is written into a slot (over the one of the same name). Everything is checked
        first, so a refused set changes nothing."""
        names = [expert.name for expert in experts]
        if len(set(names)) != len(names):
            raise ExpertNameTakenError(f"an expert set names an expert twice: {names}")
        for expert in experts:
            self.check_fits(expert)
        current = {e.name: e for e in self._experts}
        for name in [n for n in current if n not in set(names)]:
            self.unplug(name)
        for expert in experts:
            if current.get(expert.name) is not expert:
                self.plug(expert, replace=expert.name in self._slot_by_name)
        by_name = {e.name: e for e in self._experts}
        self._experts = [by_name[name] for name in names]
        return self._changed()

    def _disable(self, slot: int) -> None:
        self.thresholds[:, slot] = float("inf")
        self.covers[:, slot] = False

    def _release(self, slot: int) -> None:
        self.names[slot], self.ranks[slot], self.covered[slot] = None, 0, frozenset()
        if self.lora_weights is not None:
            self.lora_weights.forget(slot)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._pending.append((slot, event))

    def reserve(self, capacity: int, rank: int = 0) -> None:
        """Grow now to at least `capacity` slots of at least `rank`, so plugs up to there never reallocate."""
        if capacity > self.capacity or rank > self.rank:
            self._grow(max(capacity, self.capacity), max(rank, self.rank))

    def _take_slot(self, rank: int) -> int:
        still = []
        for slot, event in self._pending:
            if event is None or event.query():
                self._free.append(slot)
            else:
                still.append((slot, event))
        self._pending = still
        self._free.sort()
        capacity = self.capacity
        if not self._free:
            capacity = max(2 * capacity, 1)
        if capacity != self.capacity or rank > self.rank:
            self._grow(capacity, max(rank, self.rank))
        return self._free.pop(0)

    def _grow(self, capacity: int, rank: int) -> None:
        """Reallocate every tensor at the new capacity and rank, copying what is there (rare: doubling)."""
        c = self.capacity
        logger.info("expert slots grow from %d x rank %d to %d x rank %d", c, self.rank, capacity, rank)
        keys = torch.zeros(self.num_layers, capacity, self.hidden, device=self.device, dtype=self.dtype)
        offsets = torch.zeros(self.num_layers, capacity, device=self.device)
        thresholds = torch.full((self.num_layers, capacity), float("inf"), device=self.device)
        covers = torch.zeros(self.num_layers, capacity, dtype=torch.bool, device=self.device)
        keys[:, :c], offsets[:, :c], thresholds[:, :c], covers[:, :c] = (
            self.keys,
            self.offsets,
            self.thresholds,
            self.covers,
        )
        self.keys, self.offsets, self.thresholds, self.covers = keys, offsets, thresholds, covers
        self.weights.resize(capacity, rank)
        if self.lora_weights is not None:
            self.lora_weights.resize(capacity)
        self._free.extend(range(c, capacity))
        self.names.extend([None] * (capacity - c))
        self.ranks.extend([0] * (capacity - c))
        self.covered.extend([frozenset()] * (capacity - c))
        self.rank = rank
        self.generation += 1

    def _changed(self) -> PluggedSet:
        self.version += 1
        self.has_lora = any(not is_bottleneck(e) for e in self._experts)  # a host fact, read every decode step
        self._snapshot = None
        return self.snapshot()

    def _lora_stacks(self) -> LoraStacks | None:
        """The LoRA experts laid out by slot (moe.adapters.lora.LoraStacks): views of the slot storage; for a reference
        set, built from the experts' own tensors when they or the capacity changed."""
        if self.lora_weights is not None:
            return self.lora_weights.stacks(self.covered)
        loras = tuple((self._slot_by_name[e.name], e) for e in self._experts if not is_bottleneck(e))
        key = (self.capacity, tuple((slot, id(e)) for slot, e in loras))
        if key != self._lora_key:
            by_slot: list[Expert | None] = [None] * self.capacity
            for slot, expert in loras:
                by_slot[slot] = expert
            self._lora = LoraStacks.build(by_slot, self.num_layers, self.device, self.dtype) if loras else None
            self._lora_key = key
            self._lora_experts = loras  # held while they key the stacks: no other expert can take their ids
        return self._lora

    # --- reading ---------------------------------------------------------------------------------------------

    def snapshot(self) -> PluggedSet:
        """The set as it is now (cached until the next plug or unplug)."""
        if self._snapshot is None:
            down, up = self.weights.stacks
            ranks, covered = tuple(self.ranks), tuple(self.covered)
            self._snapshot = PluggedSet(
                experts=tuple(self._experts),
                slots=tuple(self._slot_by_name[e.name] for e in self._experts),
                columns=tuple(self.names),
                keys=self.keys,
                offsets=self.offsets,
                thresholds=self.thresholds.clone(),
                covers=self.covers.clone(),
                down=down,
                up=up,
                adapters=tuple(self.weights.layer_adapters(layer, ranks, covered) for layer in range(self.num_layers)),
                version=self.version,
                storage=self,
                lora=self._lora_stacks(),
                projections=self.projections,
            )
        return self._snapshot

    def live(self) -> PluggedSet:
        """The storage's own tensors as a set, for decode steps: its thresholds and covers are the live columns,
        so a step sees what was published before it ran, and a captured step keeps reading these addresses
        until the storage grows. It names no expert: the trace's names come from `snapshot()`."""
        if self._live is None or self._live_generation != self.generation:
            self._live_generation = self.generation
            down, up = self.weights.stacks
            self._live = PluggedSet(
                experts=(),
                slots=(),
                columns=(None,) * self.capacity,
                keys=self.keys,
                offsets=self.offsets,
                thresholds=self.thresholds,
                covers=self.covers,
                down=down,
                up=up,
                adapters=tuple(
                    self.weights.layer_adapters(layer, self.ranks, self.covered) for layer in range(self.num_layers)
                ),
                version=-1,
                storage=self,
            )
        return self._live

    def read(self, name: str) -> Expert:
        """The expert with its weights copied back out of its slot (keys come back unit-norm)."""
        slot = self.slot_of(name)
        handle = next(e for e in self._experts if e.name == name)
        if self.references:
            return handle
        layers = torch.tensor(handle.layers, dtype=torch.long, device=self.device)
        if is_bottleneck(handle):
            adapter: BottleneckAdapter | LoraAdapter = BottleneckAdapter(*self.weights.read(slot, layers, handle.rank))
        else:
            adapter = self.lora_weights.read(slot, handle.layers)
        return Expert(
            name=handle.name,
            layers=handle.layers,
            adapter=adapter,
            keys=self.keys[layers, slot].clone(),
            offsets=self.offsets[layers, slot].clone(),
            thresholds=self.thresholds[layers, slot].clone(),
            description=handle.description,
            examples=handle.examples,
            metadata=dict(handle.metadata),
        )

    def nbytes(self) -> int:
        """Device memory of the storage: gates and weights."""
        gates = (self.keys, self.offsets, self.thresholds, self.covers)
        lora = self.lora_weights.nbytes() if self.lora_weights is not None else 0
        return sum(t.numel() * t.element_size() for t in gates) + self.weights.nbytes() + lora


# --- what readers see --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PluggedSet:
    """The plugged experts at one moment: plug order, slots, and the tensors the router reads.

    Shapes (L layers, C = capacity, the columns; H hidden; R largest rank):
        keys [L, C, H] unit-norm; offsets, thresholds [L, C] (+inf: never eligible); covers [L, C] bool
        columns[c]: the name in slot c, None for a free slot; slots[i]: the slot of experts[i]
        adapters[l][c]: LayerAdapter or None (views of the slots, or the experts' own tensors for a set
            built by `build`: gradients flow)
        down [L, H, C, R], up [L, C, R, H]: the slot storage (None for a set built by `build`); zero in a LoRA
            expert's slot
        lora: the LoRA experts laid out by slot for dispatch (moe.adapters.lora.LoraStacks), None when none is plugged
        projections: the backbone's MLP projections {name: (in, out)}, what a LoRA expert must fit (None: unchecked)
    An expert's index (`index`) is its slot: the column of its scores, choices and trace counts.
    """

    experts: tuple[Expert, ...]
    slots: tuple[int, ...]
    columns: tuple[str | None, ...]
    keys: torch.Tensor
    offsets: torch.Tensor
    thresholds: torch.Tensor
    covers: torch.Tensor
    down: torch.Tensor | None
    up: torch.Tensor | None
    adapters: tuple[Sequence[LayerAdapter | None], ...]
    version: int = 0
    storage: ExpertSlots | None = None
    # --- LoRA experts (moe.adapters.lora): their stacks by slot, and what they must fit ---
    lora: LoraStacks | None = None
    projections: Mapping[str, tuple[int, int]] | None = None
    _slot_of: dict[str, int] = field(init=False, repr=False)
    _position: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_slot_of", {e.name: s for e, s in zip(self.experts, self.slots, strict=True)})
        object.__setattr__(self, "_position", {e.name: i for i, e in enumerate(self.experts)})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.experts)

    @property
    def capacity(self) -> int:
        return len(self.columns)

    def __len__(self) -> int:
        return len(self.experts)

    def __contains__(self, name: object) -> bool:
        return name in self._slot_of

    def index(self, name: str) -> int:
        """The expert's slot (its column)."""
        try:
            return self._slot_of[name]
        except KeyError:
            raise UnknownExpertError(
                f"no expert named {name!r} is plugged; plugged: {list(self.names) or 'none'}"
            ) from None

    def get(self, name: str) -> Expert:
        """The expert as plugged (a weightless handle for slot storage: use `read` for its weights)."""
        self.index(name)  # raises UnknownExpertError
        return self.experts[self._position[name]]

    @functools.cached_property
    def has_bottleneck(self) -> bool:
        """Some plugged expert is of the bottleneck kind: a host fact, no device read."""
        return any(is_bottleneck(e) for e in self.experts)

    def read(self, name: str) -> Expert:
        """The expert with its weights (copied back out of its slot for slot storage)."""
        expert = self.get(name)
        if self.storage is None or self.storage.references:
            return expert
        return self.storage.read(name)

    # --- sets built from experts (training, what-ifs): value semantics ---------------------------------

    @classmethod
    def build(
        cls,
        experts: tuple[Expert, ...],
        num_layers: int,
        hidden_size: int,
        device: torch.device,
        dtype: torch.dtype,
        version: int = 0,
        projections: Mapping[str, tuple[int, int]] | None = None,
    ) -> PluggedSet:
        """A set over exactly these experts (slot i = experts[i]) whose adapters reference the experts' own
        tensors: no copy of the weights, and gradients reach them."""
        storage = ExpertSlots(
            num_layers, hidden_size, device, dtype, capacity=len(experts), references=True, projections=projections
        )
        for expert in experts:
            storage.plug(expert)
        storage.version = version - 1
        return storage._changed()

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

    def check_fits(self, expert: Expert) -> None:
        num_layers, _, hidden = self.keys.shape
        check_fits(expert, num_layers, hidden, self.projections)

    def plugging(self, expert: Expert, replace: bool = False) -> PluggedSet:
        """A new set (built from experts, see `build`) with `expert` added, or swapped in place of the same name
        when replace. This set is unchanged."""
        self.check_fits(expert)
        if expert.name in self:
            if not replace:
                raise ExpertNameTakenError(
                    f"an expert named {expert.name!r} is already plugged; unplug it first, pass replace, "
                    "or choose another name"
                )
            experts = tuple(expert if e.name == expert.name else self.read(e.name) for e in self.experts)
        else:
            experts = (*(self.read(e.name) for e in self.experts), expert)
        return self._rebuild(experts)

    def replacing_all(self, experts: tuple[Expert, ...]) -> PluggedSet:
        """A new set (built from experts) of exactly these experts, in this order. This set is unchanged."""
        names = [expert.name for expert in experts]
        if len(set(names)) != len(names):
            raise ExpertNameTakenError(f"an expert set names an expert twice: {names}")
        for expert in experts:
            self.check_fits(expert)
        return self._rebuild(experts)

    def unplugging(self, name: str) -> PluggedSet:
        self.index(name)  # raises UnknownExpertError
        return self._rebuild(tuple(self.read(e.name) for e in self.experts if e.name != name))

    def _rebuild(self, experts: tuple[Expert, ...]) -> PluggedSet:
        num_layers, _, hidden = self.keys.shape
        return PluggedSet.build(
            experts, num_layers, hidden, self.keys.device, self.keys.dtype, self.version + 1, self.projections
        )
