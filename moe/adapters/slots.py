"""The plugged experts: preallocated slots written in place (`ExpertSlots`), and what a reader sees of them
(`PluggedSet`, an immutable snapshot).

ExpertSlots, the live storage (L = backbone layers, C = slot capacity, H = hidden, R = largest rank):

    keys        [L, C, H]     unit-norm gate keys (0 where a slot is free or skips the layer)
    offsets     [L, C] f32
    thresholds  [L, C] f32    +inf where a slot is free, disabled or skips the layer: never eligible
    covers      [L, C] bool   the slot has an adapter on that layer (what a pin may use)
    context_gates             the published set's context router, its token classifiers over base and the slot
                              columns (moe.routing.context.ContextGateColumns: weight [L, 1 + C, H], bias, floors...),
                              written whole each time a set with one is published; what decode steps read
    weights     {kind: its slot storage} for every kind in moe.adapters.kind.KINDS (each kind's own layout, e.g.
                moe.adapters.bottleneck.BottleneckSlots down [L, H, C, R], up [L, C, R, H]; moe.adapters.lora.LoraSlots
                per projection): the only copy of each plugged expert's weights. A set built from experts holds
                each kind's storage by reference instead (training sets: gradients reach the leaves, no copy)

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

Every kind's expert takes a slot the same way: its gate in the gate columns, its weights in the same slot of its
kind's storage (the other kinds' storages hold nothing there), so any plug costs one expert's slices whatever the
number plugged. Nothing here asks which kind an expert is: the kind table (moe.adapters.kind.KINDS) gives each
kind's fit check and storage. A snapshot carries each kind's layout of its storage (`layouts`, views) and the
stages a layer runs, resolved once from them (moe.adapters.dispatch): `in_block` (e.g. the LoRA plan), `after_block`
(e.g. bottleneck deltas) and `fixed` (the fixed-op decode path's operands; None while a plugged expert's kind has
no such form: then decode steps take the grouped path and the fixed-slot decoder runs eagerly, moe.decode.generation).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moe.adapters.dispatch import AfterBlock, BeforeAttention, InBlock, KindLayout
from moe.adapters.expert import Expert
from moe.adapters.kind import KINDS, KindSlots
from moe.errors import ExpertNameTakenError, IncompatibleExpertError, UnknownExpertError
from moe.routing.context import ContextGateColumns, ContextGates, ContextRouter, sample_digest

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 8
ROUTERS_KEPT = 8  # fitted context routers kept by the sets they serve (an unplug finds the previous set's)


def check_fits(
    expert: Expert, num_layers: int, hidden: int, projections: Mapping[str, tuple[int, int]] | None = None
) -> None:
    """Raise IncompatibleExpertError unless the expert's hidden size and layers fit the backbone, and its adapter
    fits the backbone's MLP projections {name: (in, out)} as its kind requires."""
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
    KINDS[expert.kind].check_fits(expert.name, expert.adapter, projections)


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
        self.references = references
        # one storage per kind, slot by slot (a reference set's hold the experts' own tensors)
        self.weights: dict[str, KindSlots] = {
            name: kind.references(num_layers, hidden, capacity, self.device, dtype)
            if references
            else kind.slots(num_layers, hidden, capacity, rank, self.device, dtype)
            for name, kind in KINDS.items()
        }
        # host-side bookkeeping, per slot
        self.names: list[str | None] = [None] * capacity
        self.covered: list[frozenset[int]] = [frozenset()] * capacity
        self._free: list[int] = list(range(capacity))  # reusable now, lowest first
        self._pending: list[tuple[int, torch.cuda.Event | None]] = []  # disabled, steps may still read them
        self._slot_by_name: dict[str, int] = {}
        self._experts: list[Expert] = []  # plug order (weightless handles, or the experts for a reference set)
        self.version = 0  # bumped by every plug and unplug
        self.generation = 0  # bumped when the tensors are reallocated (capacity or rank grew)
        self._snapshot: PluggedSet | None = None
        self._live: dict[tuple[bool, int] | None, PluggedSet] = {}  # by the context form they route by (live())
        self._live_generation = -1
        self.context_gates = ContextGateColumns(num_layers, hidden, capacity, self.device)
        # what the gate columns hold: (router, slots, storage generation, covers) of the set last written
        self._written: tuple[ContextRouter | None, tuple[int, ...], int, torch.Tensor | None] = (None, (), -1, None)
        # some plugged expert's kind has no fixed-op decode form (LoRA: a plan made on the host per layer): no
        # captured or compiled step may run the set (moe.decode.generation runs it eagerly); read every decode step
        self.eager_only = False
        # fitted context routers by the set they serve, ((name, sample digest), ...) in plug order, newest last:
        # each change of the set publishes the one fitted for the new set, or none (sequence mode then decides
        # from the cosine gates' counts). An unplug finds the router of the set before the plug, the same object.
        self._routers: dict[tuple[tuple[str, str], ...], ContextRouter] = {}
        self._digests: dict[str, str] = {}  # per plugged name, sample_digest of its domain texts

    def offer_router(self, router: ContextRouter) -> None:
        """Keep a fitted context router for the set it was fitted on (`router.fitted_on`); it is published with
        the set whenever the plugged experts are exactly those (now, or after the plug or swap to come). Published
        now (a router for the current set, other than the one it has), it is written into the gate columns that
        decode steps read: like a plug, between steps."""
        self._routers.pop(router.fitted_on, None)
        self._routers[router.fitted_on] = router
        while len(self._routers) > ROUTERS_KEPT:
            self._routers.pop(next(iter(self._routers)))
        if router.fitted_on == self._router_key():
            self._changed()

    def _router_key(self) -> tuple[tuple[str, str], ...]:
        return tuple((e.name, self._digests[e.name]) for e in self._experts)

    @property
    def capacity(self) -> int:
        return len(self.names)

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
        if expert.name in self._slot_by_name and not replace:
            raise ExpertNameTakenError(
                f"an expert named {expert.name!r} is already plugged; unplug it first, pass replace, "
                "or choose another name"
            )
        self._write(expert)
        return self._changed()

    def _write(self, expert: Expert) -> None:
        """Write a checked expert into a free slot and publish it (over the one of the same name, if any)."""
        old = self._slot_by_name.get(expert.name)
        slot = self._take_slot(KINDS[expert.kind].slot_rank(expert.adapter))
        layers = torch.tensor(expert.layers, dtype=torch.long, device=self.device)
        with torch.no_grad():
            # 1. weights and gate into a slot no step can choose (thresholds +inf, covers False); every kind's
            # storage clears the slot, the expert's own kind writes it
            for storage in self.weights.values():
                storage.write(slot, expert.layers, expert.adapter)
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
        handle = expert if self.references else expert.weightless()
        if old is not None:
            self._release(old)
        self.names[slot], self.covered[slot] = expert.name, frozenset(expert.layers)
        self._slot_by_name[expert.name] = slot
        self._digests[expert.name] = sample_digest(expert)
        if old is not None:
            self._experts = [handle if e.name == expert.name else e for e in self._experts]
        else:
            self._experts.append(handle)

    def unplug(self, name: str) -> Expert:
        """Disable the expert's slot (no step can choose it from now on); it is reused once steps already
        enqueued are done. Returns the expert (a weightless handle for slot storage)."""
        slot = self.slot_of(name)
        with torch.no_grad():
            self._disable(slot)
        self._release(slot)
        del self._slot_by_name[name]
        del self._digests[name]
        expert = next(e for e in self._experts if e.name == name)
        self._experts = [e for e in self._experts if e.name != name]
        self._changed()
        return expert

    def set_all(self, experts: Sequence[Expert]) -> PluggedSet:
        """Make the plugged experts exactly these, in this order (a whole expert-set version at once): experts
        not named leave, an expert that is already plugged (the same object as its handle) keeps its slot
        untouched, every other one is written into a slot (over the one of the same name). Every expert to write
        is checked first (the kept ones were checked when plugged), so a refused set changes nothing."""
        names = [expert.name for expert in experts]
        if len(set(names)) != len(names):
            raise ExpertNameTakenError(f"an expert set names an expert twice: {names}")
        current = {e.name: e for e in self._experts}
        new = [expert for expert in experts if current.get(expert.name) is not expert]
        for expert in new:
            self.check_fits(expert)
        for name in [n for n in current if n not in set(names)]:
            self.unplug(name)
        for expert in new:
            self._write(expert)
        by_name = {e.name: e for e in self._experts}
        self._experts = [by_name[name] for name in names]
        return self._changed()

    def _disable(self, slot: int) -> None:
        self.thresholds[:, slot] = float("inf")
        self.covers[:, slot] = False

    def _release(self, slot: int) -> None:
        self.names[slot], self.covered[slot] = None, frozenset()
        for storage in self.weights.values():
            storage.forget(slot)
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
        for storage in self.weights.values():
            storage.resize(capacity, rank)
        self.context_gates.resize(capacity)
        self._free.extend(range(c, capacity))
        self.names.extend([None] * (capacity - c))
        self.covered.extend([frozenset()] * (capacity - c))
        self.rank = rank
        self.generation += 1

    def _changed(self) -> PluggedSet:
        self.version += 1
        self._snapshot = None
        snapshot = self.snapshot()
        self.eager_only = snapshot.eager_only
        if snapshot.gates is not None and not self.references and not self._gates_written(snapshot):
            # publish its context gates into the gate columns (between steps, as every other write here; gates
            # already there are not written again: re-offering the current set's router touches nothing a step reads)
            self.context_gates.write(snapshot.gates)
            self._written = (snapshot.context, snapshot.slots, self.generation, snapshot.covers)
        return snapshot

    def _gates_written(self, snapshot: PluggedSet) -> bool:
        """Whether the gate columns hold this set's gates: the same router over the same slots and covers."""
        router, slots, generation, covers = self._written
        return (
            router is snapshot.context
            and slots == snapshot.slots
            and generation == self.generation
            and covers is not None
            and torch.equal(covers, snapshot.covers)
        )

    # --- reading ---------------------------------------------------------------------------------------------

    def snapshot(self) -> PluggedSet:
        """The set as it is now (cached until the next plug or unplug)."""
        if self._snapshot is None:
            covered = tuple(self.covered)
            self._snapshot = PluggedSet(
                experts=tuple(self._experts),
                slots=tuple(self._slot_by_name[e.name] for e in self._experts),
                columns=tuple(self.names),
                keys=self.keys,
                offsets=self.offsets,
                thresholds=self.thresholds.clone(),
                covers=self.covers.clone(),
                layouts={name: storage.layout(covered, live=False) for name, storage in self.weights.items()},
                version=self.version,
                storage=self,
                projections=self.projections,
                context=self._routers.get(self._router_key()) if self._experts else None,
            )
        return self._snapshot

    def live(self, context: tuple[bool, int] | None = None) -> PluggedSet:
        """The storage's own tensors as a set, for decode steps: its thresholds and covers are the live columns,
        so a step sees what was published before it ran, and a captured or compiled step keeps reading these
        addresses until the storage grows. It names no expert (the trace's names come from `snapshot()`) and holds
        the kinds with a fixed-op form only (it serves while no other kind's expert is plugged).

        context: how the published set routes token mode (its `context_form`): None, by the cosine gates;
        (floored, skip), by its context router, whose gates the step then reads from the gate columns
        (`context_gates`, written on publish). One set per form, kept until the storage grows."""
        if self._live_generation != self.generation:
            self._live_generation = self.generation
            self._live.clear()
        live = self._live.get(context)
        if live is None:
            layouts = {name: storage.layout(self.covered, live=True) for name, storage in self.weights.items()}
            live = PluggedSet(
                experts=(),
                slots=(),
                columns=(None,) * self.capacity,
                keys=self.keys,
                offsets=self.offsets,
                thresholds=self.thresholds,
                covers=self.covers,
                layouts={name: layout for name, layout in layouts.items() if layout is not None and layout.fixed},
                version=-1,
                storage=self,
                live=True,
                live_gates=None if context is None else self.context_gates.gates(*context),
            )
            self._live[context] = live
        return live

    def read(self, name: str) -> Expert:
        """The expert with its weights copied back out of its slot (keys come back unit-norm)."""
        slot = self.slot_of(name)
        handle = next(e for e in self._experts if e.name == name)
        if self.references:
            return handle
        layers = torch.tensor(handle.layers, dtype=torch.long, device=self.device)
        return Expert(
            name=handle.name,
            layers=handle.layers,
            adapter=self.weights[handle.kind].read(slot, handle.layers, handle.adapter),
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
        weights = sum(storage.nbytes() for storage in self.weights.values())
        return sum(t.numel() * t.element_size() for t in gates) + weights + self.context_gates.nbytes()


# --- what readers see --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PluggedSet:
    """The plugged experts at one moment: plug order, slots, and the tensors the router reads.

    Shapes (L layers, C = capacity, the columns; H hidden; R largest rank):
        keys [L, C, H] unit-norm; offsets, thresholds [L, C] (+inf: never eligible); covers [L, C] bool
        columns[c]: the name in slot c, None for a free slot; slots[i]: the slot of experts[i]
        layouts[kind]: each kind's storage laid out for dispatch (moe.adapters.dispatch.KindLayout: views of the
            slots, or the experts' own tensors for a set built by `build`: gradients flow); None when it holds nothing
        projections: the backbone's MLP projections {name: (in, out)}, what an adapter must fit (None: unchecked)
    Resolved once from the layouts of the kinds the set holds experts of (every kind with a fixed-op form, for the
    live set), so a forward never consults the kind table (moe.adapters.dispatch):
        in_block     the stages run inside a layer's block (a plan its modules read), in table order
        after_block  the stages whose deltas are added to the block's output, in table order
        fixed        per layer, the fixed-op decode path's operands; None when some expert's kind has no such form
        before_attention  per layer, the split of its decision between the attention and the MLP input
                     (moe.adapters.dispatch.BeforeAttention), None on a layer no early expert covers; () when the
                     set holds none (every decision at the MLP input, as before)
    context: the context router fitted for exactly these experts (moe.routing.context; classes base + names in
        plug order), or None: sequence mode then decides from the cosine gates' counts (decide_sequence)
    gates: its token classifiers laid out over the slot columns (when it has them): token mode's choice (top-1),
        in place of the cosine gates; None: the cosine gates choose. The live set's are `live_gates`, views of the
        storage's gate columns (ExpertSlots.live); context_form: (gates.floored, gates.skip), None without gates:
        the host facts a decode step's code depends on (a compiled step is kept per form)
    An expert's index (`index`) is its slot: the column of its scores, choices and trace counts.
    """

    experts: tuple[Expert, ...]
    slots: tuple[int, ...]
    columns: tuple[str | None, ...]
    keys: torch.Tensor
    offsets: torch.Tensor
    thresholds: torch.Tensor
    covers: torch.Tensor
    layouts: Mapping[str, KindLayout | None]
    version: int = 0
    storage: ExpertSlots | None = None
    projections: Mapping[str, tuple[int, int]] | None = None
    live: bool = False
    context: ContextRouter | None = None
    live_gates: ContextGates | None = None  # the live set's gates (the storage's gate columns), as given
    in_block: tuple[InBlock, ...] = field(init=False)
    gates: ContextGates | None = field(init=False)  # the context router's token classifiers over the slot columns
    after_block: tuple[AfterBlock, ...] = field(init=False)
    before_attention: tuple[BeforeAttention | None, ...] = field(init=False)
    fixed: tuple[tuple[torch.Tensor, ...], ...] | None = field(init=False)
    context_form: tuple[bool, int] | None = field(init=False)
    # derived once here (a set never changes): what every step reads, plain attributes rather than properties
    names: tuple[str, ...] = field(init=False)  # the experts' names, plug order
    capacity: int = field(init=False)  # C, the columns
    slot_by_name: Mapping[str, int] = field(init=False, repr=False)  # {name: its slot}; `name in set` reads it
    eager_only: bool = field(init=False)  # no fixed-op decode form for this set: only a kind without one (LoRA)
    #   or a set of references; a set routed by its context router has it (see below)
    _position: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = tuple(e.name for e in self.experts)
        assert self.context is None or self.context.classes[1:] == names, (self.context.classes, names)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "capacity", len(self.columns))
        object.__setattr__(self, "slot_by_name", dict(zip(names, self.slots, strict=True)))
        gates = self.live_gates
        if gates is None and self.context is not None and self.context.layers:
            gates = ContextGates.of(self.context, self.slots, self.capacity, self.keys.device, self.covers)
        object.__setattr__(self, "gates", gates)
        object.__setattr__(self, "context_form", None if gates is None else (gates.floored, gates.skip))
        object.__setattr__(self, "_position", {e.name: i for i, e in enumerate(self.experts)})
        held = {e.kind for e in self.experts}
        run = {
            name: layout for name, layout in self.layouts.items() if layout is not None and (self.live or name in held)
        }
        object.__setattr__(self, "in_block", tuple(r.in_block for r in run.values() if r.in_block is not None))
        after = {name: r.after_block for name, r in run.items() if r.after_block is not None}
        if len(after) > 1:  # several kinds after the block: each stage runs its own experts' choices only
            device = self.keys.device
            after = {
                name: dataclasses.replace(
                    stage,
                    own=torch.tensor([c is not None and c.kind == name for c in self._by_slot()], device=device),
                )
                for name, stage in after.items()
            }
        object.__setattr__(self, "after_block", tuple(after.values()))
        object.__setattr__(self, "before_attention", self._before_attention())
        # the fixed-op decode path: one kind's form, while every expert of the set is of a kind that has it
        forms = [r.fixed for r in run.values()]
        if not run:  # no expert: the form of whichever kind offers one (the empty set decodes as before a plug)
            forms = [layout.fixed for layout in self.layouts.values() if layout is not None][:1]
        fixed = forms[0] if len(forms) == 1 else None
        object.__setattr__(self, "fixed", fixed)
        # no fixed-op decode form (an expert's kind has none, e.g. LoRA's host-made plan; or the set holds
        # references): no captured or compiled step may run the set (moe.decode.static_decoder runs it eagerly).
        # Token mode by the context router is no reason: its gates are in the storage's gate columns (fixed shapes,
        # written on publish) and its step reads nothing on the host (moe.routing.context.ContextGates.step)
        object.__setattr__(self, "eager_only", fixed is None)

    def _before_attention(self) -> tuple[BeforeAttention | None, ...]:
        """Per layer, the split between the early slots (decided at the attention input) and the others."""
        stages = [stage for stage in self.in_block if stage.early is not None]
        if not stages:
            return ()
        early = stages[0].early
        for stage in stages[1:]:
            early = early | stage.early
        plans = tuple(stage.plan for stage in stages)
        never = torch.tensor(float("inf"), device=self.thresholds.device)
        out: list[BeforeAttention | None] = []
        for layer in range(self.thresholds.shape[0]):
            if not any(stage.early_on_layer[layer] for stage in stages):
                out.append(None)
                continue
            thresholds, covers = self.thresholds[layer], self.covers[layer]
            out.append(
                BeforeAttention(
                    thresholds=torch.where(early, thresholds, never),
                    covers=covers & early,
                    late_thresholds=torch.where(early, never, thresholds),
                    late_covers=covers & ~early,
                    late_allowed=~early,
                    plans=plans,
                )
            )
        return tuple(out)

    def _by_slot(self) -> list[Expert | None]:
        by_slot: list[Expert | None] = [None] * self.capacity
        for expert, slot in zip(self.experts, self.slots, strict=True):
            by_slot[slot] = expert
        return by_slot

    def __len__(self) -> int:
        return len(self.experts)

    def __contains__(self, name: object) -> bool:
        return name in self.slot_by_name

    def index(self, name: str) -> int:
        """The expert's slot (its column)."""
        try:
            return self.slot_by_name[name]
        except KeyError:
            raise UnknownExpertError(
                f"no expert named {name!r} is plugged; plugged: {list(self.names) or 'none'}"
            ) from None

    def get(self, name: str) -> Expert:
        """The expert as plugged (a weightless handle for slot storage: use `read` for its weights)."""
        self.index(name)  # raises UnknownExpertError
        return self.experts[self._position[name]]

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
        when replace. This set is unchanged (`build` checks the experts)."""
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
        """A new set (built from experts, which checks them) of exactly these experts, in this order. This set is
        unchanged."""
        names = [expert.name for expert in experts]
        if len(set(names)) != len(names):
            raise ExpertNameTakenError(f"an expert set names an expert twice: {names}")
        return self._rebuild(experts)

    def unplugging(self, name: str) -> PluggedSet:
        self.index(name)  # raises UnknownExpertError
        return self._rebuild(tuple(self.read(e.name) for e in self.experts if e.name != name))

    def with_router(self, router: ContextRouter | None) -> PluggedSet:
        """This set (built from experts) routed by `router`, a context router fitted for exactly its experts in
        this order (None: the cosine gates): what admission measures a set under, the router that will serve it.
        The weights are shared; this set is unchanged."""
        if self.live:
            raise ValueError("the live set's router is published by its slots (offer_router), not set on it")
        return dataclasses.replace(self, context=router)

    def _rebuild(self, experts: tuple[Expert, ...]) -> PluggedSet:
        num_layers, _, hidden = self.keys.shape
        return PluggedSet.build(
            experts, num_layers, hidden, self.keys.device, self.keys.dtype, self.version + 1, self.projections
        )
