"""The LoRA expert kind: LoRA pairs on a decoder layer's own projections (MLP and attention), applied to the
tokens routed to it.

For a token routed to LoRA expert e on layer l, every projection p that e targets computes

    y = W_p x + scaling[e, l, p] * B[e, l, p] @ (A[e, l, p] @ x)      A [r, in], B [out, r]  (PEFT's layout)

inside the backbone's own forward, so the blocks run with the adapter in them (Llama MLP:
down(act(gate(x) + dg) * (up(x) + du)) + dd; attention: softmax((q + dq)(k + dk)^T) (v + dv), then o + do):
what PEFT computes with that adapter active. Targets are named as in moe.model.backbone.Family: MLP projections
by their attribute (`down_proj`), attention projections by their path from the decoder layer (`self_attn.q_proj`,
GPT-2's fused `attn.c_attn`); a dotted target is an attention one.

The router's decision is one per token per layer, covering both blocks (moe.model.routed):
    an expert with no attention target (MLP-only)  decided at the MLP input, as every expert always was
    an expert with an attention target            decided before attention, at the attention block's input
                                                  (its gate's keys read that input), since its q/k/v deltas
                                                  must be in the token's K/V as the cache keeps them
A layer holding both kinds of expert decides before attention among the attention experts; a token none of them
took is decided at the MLP input among the others. Either way a token takes one route per layer, and an
attention expert's route covers its MLP targets too.

The pieces, in the order a forward uses them:
    LoraAdapter       an expert's pairs: per projection p, A [Lx, r_p, in_p], B [Lx, out_p, r_p], scaling [Lx]
    Lora              the kind (moe.adapters.kind.AdapterKind): its expert-file fields (`lora` metadata: the
                      targets; tensors lora.<p>.A/B/scaling), its fit check against the MLP's projections, the
                      projection wrappers, its slot storage
    LoraSlots         the live slot storage of plugged LoRA experts (moe.adapters.slots.ExpertSlots): one slot written
                      per plug, the only copy of their weights, kept transposed (A^T, B^T: the operands the matmuls
                      take as they are) (LoraReferences: a training set's, by reference)
    LoraStacks        what a plugged set reads (its layout, moe.adapters.dispatch.KindLayout): the LoRA pairs per
                      (layer, expert), and zero-padded stacks per (layer, projection) for the gathered decode path
                      (views of LoraSlots; or, for a set built from experts, built from the experts' own tensors)
    plan_lora         RoutedMLP's call on one layer (the kind's in-block stage): from the choice [N, k], the LoRA
                      plan (which rows each LoRA expert won, or each row's LoRA expert) and the choice left to the
                      kinds run after the block
    LoraPlan          the plan, set on the step while a block runs; read by the block's projections (the
                      attention block's plan comes from the decision before attention, the MLP's from the layer's
                      whole decision)
    RoutedProjection  wraps one projection (never edited): its output, plus the plan's deltas on the routed
                      rows only (clone + index_add_: every other row bit for bit)
The plain per-token loops all this must equal are moe.adapters.reference.reference_mlp and reference_decode (tests).

Semantics with top-k > 1 (moe.adapters.reference.reference_mlp spells them out): a token that chose the
experts C (any kinds, k' = |C|) runs the block with every chosen LoRA merged at weight 1/k' (a weight-space
average, W_p + sum_e s_e B_e A_e / k'), and every chosen bottleneck expert's delta / k' is added to the block's
output. For top-1 (the default) that is exactly the LoRA's own MLP, or exactly the bottleneck expert.

Cost: grouped (prefill, training) reads the plan on the host once per layer (shared by the layer's
projections), then each LoRA expert that won tokens runs two small matmuls on its rows only; experts that
won nothing cost nothing. One expert on every row (a pinned batch) runs x A^T, then one addmm_ into the
projection's output with the scaling as its alpha: no sort, no index, no multiply. Gathered (decode-sized
top-1) gathers each row's A, B from the stacks: no host read.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from moe.adapters.dispatch import InBlock
from moe.errors import IncompatibleExpertError, InvalidMetadataError, MetadataTooLargeError
from moe.model.backbone import FAMILIES, BackboneFingerprint, Family

NAME = "lora"


def is_attention_target(target: str) -> bool:
    """An attention projection (`self_attn.q_proj`: its path from the decoder layer), not an MLP one."""
    return "." in target


def lora_delta(
    x: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor, scaling: float, base: torch.Tensor | None = None
) -> torch.Tensor:
    """x [N, in], a_t = A^T [in, r], b_t = B^T [r, out] -> [N, out]; PEFT's op order: lora_B(lora_A(x)) * scaling.
    The operands come transposed (as slot storage keeps them): two plain matmuls, no transpose, and on CPU the
    kernels for a row-major right operand (measured at about half the time of F.linear's transposed one at N=16).

    base [N, out]: base + that instead, in one addmm with the scaling as its alpha (no multiply of its own), in
    place when no gradient is taken (the caller's base is the projection's fresh output: nothing else holds it)."""
    h = torch.mm(x, a_t)  # [N, r]
    if base is None:
        return torch.mm(h, b_t) * scaling
    if torch.is_grad_enabled():
        return torch.addmm(base, h, b_t, alpha=scaling)
    return base.addmm_(h, b_t, alpha=scaling)


# --- an expert's adapter ----------------------------------------------------------------------------------


@dataclass
class LoraPair:
    """One projection's LoRA over the expert's layers (Lx = covered layers, r = largest rank on them).

    A [Lx, r, in], B [Lx, out, r], scaling [Lx] float32 (alpha / r, or alpha / sqrt(r) with rsLoRA). A layer
    with a smaller rank is zero-padded, and a layer the projection is not adapted on is all zero (scaling 0):
    both exact, since the padded rows and columns contribute exactly nothing.
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """(in, out) of the projection it adapts."""
        return int(self.A.shape[2]), int(self.B.shape[1])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraPair:
        return LoraPair(
            self.A.detach().to(device, dtype),
            self.B.detach().to(device, dtype),
            self.scaling.detach().to(device, torch.float32),
        )


@dataclass
class LoraAdapter:
    """The LoRA kind's adapter: {projection: LoraPair}, projections named as in moe.model.backbone.FAMILIES."""

    pairs: dict[str, LoraPair]
    kind: ClassVar[str] = NAME

    @property
    def rank(self) -> int:
        return max(pair.rank for pair in self.pairs.values())

    @property
    def num_layers(self) -> int:
        return int(next(iter(self.pairs.values())).A.shape[0])

    @property
    def routes_before_attention(self) -> bool:
        """It adapts an attention projection: its decision is taken before attention (its gate reads there)."""
        return any(is_attention_target(p) for p in self.pairs)

    def targets(self) -> dict[str, dict[str, int]]:
        """{projection: {rank, in, out}}: what the expert file's `lora` metadata records."""
        return {p: {"rank": pair.rank, "in": pair.shape[0], "out": pair.shape[1]} for p, pair in self.pairs.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for p, pair in self.pairs.items():
            out[f"lora.{p}.A"], out[f"lora.{p}.B"], out[f"lora.{p}.scaling"] = pair.A, pair.B, pair.scaling
        return out

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraAdapter:
        return LoraAdapter({p: pair.to(device, dtype) for p, pair in self.pairs.items()})

    def weightless(self) -> LoraAdapter:
        """Shapes and dtypes only: tensors on the meta device."""
        return LoraAdapter({p: LoraPair(_meta(q.A), _meta(q.B), _meta(q.scaling)) for p, q in self.pairs.items()})

    def check(self, layers: int, hidden: int) -> None:
        """Internal invariant (files are validated with specific errors before an Expert is built)."""
        assert self.pairs, "a LoRA adapter adapts at least one projection"
        for p, pair in self.pairs.items():
            r = pair.rank
            assert pair.A.shape[0] == pair.B.shape[0] == layers and pair.B.shape[2] == r, (p, pair.A.shape)
            assert pair.scaling.shape == (layers,), (p, pair.scaling.shape)
        del hidden  # which side of a projection is the hidden one depends on the family: checked at plug time

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], targets: Sequence[str]) -> LoraAdapter:
        return cls(
            {p: LoraPair(tensors[f"lora.{p}.A"], tensors[f"lora.{p}.B"], tensors[f"lora.{p}.scaling"]) for p in targets}
        )


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


# --- the expert file's LoRA fields (the kind's file calls, below) --------------------------------------------


def parse_targets(raw: str | None) -> dict[str, dict[str, int]]:
    """The `lora` metadata field: JSON {"targets": {projection: {"rank", "in", "out"}}}, sizes JSON integers."""
    if not raw:
        raise InvalidMetadataError("a LoRA expert file's metadata lacks 'lora' (its targets); re-export the expert")
    expected = 'expected {"targets": {projection: {"rank": int, "in": int, "out": int}}}'
    try:
        parsed = json.loads(raw)
    except ValueError as e:
        raise InvalidMetadataError(f"metadata 'lora' is malformed JSON ({e}); {expected}") from None
    except RecursionError:
        raise MetadataTooLargeError("expert file metadata 'lora' nests too deeply") from None
    targets = parsed.get("targets") if isinstance(parsed, dict) else None
    if not isinstance(targets, dict):
        raise InvalidMetadataError(f"metadata 'lora' is malformed ({raw[:200]!r}); {expected}")
    if not targets:
        raise InvalidMetadataError("metadata 'lora' names no target projection")
    out: dict[str, dict[str, int]] = {}
    for p, t in targets.items():
        sizes = {k: t.get(k) for k in ("rank", "in", "out")} if isinstance(t, dict) else {}
        if not sizes or not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes.values()):
            raise InvalidMetadataError(f"metadata 'lora' is malformed: target {p!r} is {t!r}; {expected}")
        out[p] = sizes
    return out


def file_shapes(
    layers: int, hidden: int, family: Family, targets: Mapping[str, Mapping[str, int]]
) -> dict[str, tuple[int, ...]]:
    """Every LoRA tensor's shape from the metadata, after checking the targets against the family: each a
    projection of its MLP or attention block (`family.targets`), the input projections reading the hidden size
    and each block's last one writing it, ranks >= 1. (in, out) against the loaded backbone's modules is checked
    at plug time (check_fits)."""
    unknown = sorted(set(targets) - set(family.targets))
    if unknown:
        raise InvalidMetadataError(
            f"LoRA targets {unknown} are not MLP or attention projections of this backbone family "
            f"({list(family.targets)})"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for p, t in targets.items():
        rank, d_in, d_out = t["rank"], t["in"], t["out"]
        hidden_side = d_out if family.writes_hidden(p) else d_in
        if rank < 1 or d_in < 1 or d_out < 1 or hidden_side != hidden:
            raise InvalidMetadataError(
                f"LoRA target {p} (rank {rank}, {d_in} -> {d_out}) does not fit a backbone of hidden size {hidden}"
            )
        shapes[f"lora.{p}.A"] = (layers, rank, d_in)
        shapes[f"lora.{p}.B"] = (layers, d_out, rank)
        shapes[f"lora.{p}.scaling"] = (layers,)
    return shapes


def check_fits(name: str, adapter: LoraAdapter, projections: Mapping[str, tuple[int, int]] | None) -> None:
    """A LoRA expert's targets and shapes against the backbone's projections {target: (in, out)}
    (moe.model.routed.RoutedModel.target_shapes: MLP and attention)."""
    if projections is None:
        return
    unknown = sorted(set(adapter.pairs) - set(projections))
    if unknown:
        raise IncompatibleExpertError(
            f"LoRA expert {name!r} adapts {unknown}, which are not MLP or attention projections of this backbone "
            f"({sorted(projections)})"
        )
    for p, pair in adapter.pairs.items():
        if pair.shape != tuple(projections[p]):
            raise IncompatibleExpertError(
                f"LoRA expert {name!r}: its {p} maps {pair.shape[0]} -> {pair.shape[1]}, the backbone's "
                f"{p} maps {projections[p][0]} -> {projections[p][1]}"
            )


# --- per plugged set: the LoRA pairs per (layer, expert) and the gathered path's stacks ------------------


@dataclass(frozen=True, eq=False)
class LoraStacks:
    """The plugged set's LoRA experts, laid out for dispatch (L layers, E columns: the set's slots, every kind;
    `build` takes (layers, adapter) by column, None for a free slot or another kind's expert).

    is_lora [E] bool                  which plugged experts are LoRA experts
    on_layer[l]                       some plugged LoRA expert covers layer l (host fact)
    early [E] bool | None             which plugged experts adapt attention (decided before attention); None: none
    early_on_layer[l]                 some of those covers layer l (host fact)
    pairs[l][e]                       {projection: (A^T [in, r], B^T [r, out], scaling float)} for a LoRA expert
                                      e on a layer it covers, else None: transposed, as lora_delta takes them;
                                      views of the slot storage, or of the expert's own tensors
    a[l][p] [E, in, R], b[l][p] [E, R, out], s[l][p] [E] float32
                                      every expert's pair (transposed) padded to the largest rank R of p, zero
                                      where an expert is not a LoRA on p and l (exact): for gathering
    only_lora                         host fact: every plugged expert is a LoRA expert (a choice is all this kind's)
    """

    is_lora: torch.Tensor
    on_layer: tuple[bool, ...]
    early: torch.Tensor | None
    early_on_layer: tuple[bool, ...]
    pairs: Sequence[Sequence[dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None]]
    a: tuple[dict[str, torch.Tensor], ...]
    b: tuple[dict[str, torch.Tensor], ...]
    s: tuple[dict[str, torch.Tensor], ...]
    only_lora: bool = False

    @property
    def in_block(self) -> InBlock:
        """The kind's stage in a layer: plan_lora over these stacks (moe.adapters.dispatch)."""
        return InBlock(functools.partial(plan_lora, self), self.on_layer, self.early, self.early_on_layer)

    @property
    def after_block(self) -> None:
        return None

    @property
    def fixed(self) -> None:
        return None  # no fixed-op decode form: a set holding a LoRA expert decodes on the grouped path

    @classmethod
    def build(
        cls,
        by_slot: Sequence[tuple[Sequence[int], LoraAdapter] | None],
        num_layers: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> LoraStacks | None:
        """None when no plugged expert is a LoRA (the other kinds then run exactly as without this kind)."""
        loras = {e: entry for e, entry in enumerate(by_slot) if entry is not None}
        if not loras:
            return None
        count = len(by_slot)
        shapes: dict[str, tuple[int, int, int]] = {}  # projection -> (largest rank, in, out)
        for _, adapter in loras.values():
            for p, pair in adapter.pairs.items():
                rank = max(pair.rank, shapes.get(p, (0, 0, 0))[0])
                shapes[p] = (rank, *pair.shape)
        pairs: list[list[dict | None]] = [[None] * count for _ in range(num_layers)]
        a = [{p: torch.zeros(count, i, r, device=device, dtype=dtype) for p, (r, i, _) in shapes.items()}]
        a += [{p: t.clone() for p, t in a[0].items()} for _ in range(num_layers - 1)]
        b = [
            {p: torch.zeros(count, r, o, device=device, dtype=dtype) for p, (r, _, o) in shapes.items()}
            for _ in range(num_layers)
        ]
        s = [{p: torch.zeros(count, device=device) for p in shapes} for _ in range(num_layers)]
        for e, (layers, adapter) in loras.items():
            for i, layer in enumerate(layers):
                pairs[layer][e] = {}
                for p, pair in adapter.pairs.items():
                    scaling = float(pair.scaling[i])
                    pairs[layer][e][p] = (pair.A[i].t(), pair.B[i].t(), scaling)
                    with torch.no_grad():
                        a[layer][p][e, :, : pair.rank] = pair.A[i].t()
                        b[layer][p][e, : pair.rank] = pair.B[i].t()
                        s[layer][p][e] = scaling
        early = [e for e, (_, adapter) in loras.items() if adapter.routes_before_attention]
        return cls(
            is_lora=torch.tensor([e in loras for e in range(count)], dtype=torch.bool, device=device),
            on_layer=tuple(any(pair is not None for pair in row) for row in pairs),
            early=torch.tensor([e in early for e in range(count)], device=device) if early else None,
            early_on_layer=tuple(any(e in early and row[e] is not None for e in loras) for row in pairs),
            pairs=tuple(tuple(row) for row in pairs),
            a=tuple(a),
            b=tuple(b),
            s=tuple(s),
        )


class LoraSlots:
    """Plugged LoRA experts' weights in slot storage, written in place (moe.adapters.slots.ExpertSlots keeps one;
    C slots,
    shared with the gates: a slot holds a LoRA expert or not). The only copy of a plugged LoRA expert's weights.

    a[p] [L, C, in, R_p], b[p] [L, C, R_p, out], s[p] [L, C] float32   per projection p, allocated when the first
        LoRA expert adapting p is plugged; R_p grows to the largest rank plugged on p (zero padding is exact). A and
        B are kept transposed (A^T, B^T: what lora_delta multiplies by, row-major, with no transpose per step)
    is_lora [C] bool (device); host mirrors per slot: its ranks {p: r}, scalings {p: L floats} (which layers a
        slot covers is the gate storage's host fact, passed to `stacks`)

    A plug writes one slot (zeroing what it held before), whatever the number plugged; `stacks()` lays the storage
    out for a snapshot as views (no copy): the same LoraStacks a set built from experts gets.
    """

    def __init__(self, num_layers: int, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.num_layers, self.device, self.dtype = num_layers, device, dtype
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.s: dict[str, torch.Tensor] = {}
        self.is_lora = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.ranks: list[dict[str, int]] = [{} for _ in range(capacity)]
        self.scalings: list[dict[str, tuple[float, ...]]] = [{} for _ in range(capacity)]

    @property
    def capacity(self) -> int:
        return len(self.ranks)

    def resize(self, capacity: int, rank: int = 0) -> None:
        """Grow to `capacity` slots, copying what is there (moe.adapters.slots.ExpertSlots doubles it); each
        projection's rank grows when a LoRA of a larger rank is written (`rank` is the other kinds')."""
        c = self.capacity
        for p in self.a:
            self.a[p] = _grown(self.a[p], 1, capacity)
            self.b[p] = _grown(self.b[p], 1, capacity)
            self.s[p] = _grown(self.s[p], 1, capacity)
        self.is_lora = _grown(self.is_lora, 0, capacity)
        self.ranks.extend({} for _ in range(capacity - c))
        self.scalings.extend({} for _ in range(capacity - c))

    def _room(self, p: str, pair: LoraPair) -> None:
        """Storage for projection p at least pair's rank (allocated, or its rank grown)."""
        (fan_in, fan_out), rank = pair.shape, pair.rank
        if p not in self.a:
            L, C = self.num_layers, self.capacity  # noqa: N806
            self.a[p] = torch.zeros(L, C, fan_in, rank, device=self.device, dtype=self.dtype)
            self.b[p] = torch.zeros(L, C, rank, fan_out, device=self.device, dtype=self.dtype)
            self.s[p] = torch.zeros(L, C, device=self.device)
        elif self.a[p].shape[3] < rank:
            self.a[p] = _grown(self.a[p], 3, rank)
            self.b[p] = _grown(self.b[p], 2, rank)

    @torch.no_grad()
    def write(self, slot: int, layers: Sequence[int], adapter: object) -> None:
        """Clear the slot, then write the adapter's pairs into it when it is a LoRA (layers by position)."""
        for p in self.a:
            self.a[p][:, slot].zero_()
            self.b[p][:, slot].zero_()
            self.s[p][:, slot].zero_()
        self.forget(slot)
        if not isinstance(adapter, LoraAdapter):
            return
        index = torch.tensor(list(layers), dtype=torch.long, device=self.device)
        for p, pair in adapter.pairs.items():
            self._room(p, pair)
            r = pair.rank
            self.a[p][index, slot, :, :r] = pair.A.detach().to(self.device, self.dtype).transpose(1, 2)  # [Lx, in, r]
            self.b[p][index, slot, :r] = pair.B.detach().to(self.device, self.dtype).transpose(1, 2)  # [Lx, r, out]
            self.s[p][index, slot] = pair.scaling.detach().to(self.device, torch.float32)
            scaling = [0.0] * self.num_layers
            for layer, value in zip(layers, pair.scaling.detach().float().cpu().tolist(), strict=True):
                scaling[layer] = value
            self.ranks[slot][p], self.scalings[slot][p] = r, tuple(scaling)
        self.is_lora[slot] = True

    def forget(self, slot: int) -> None:
        """The slot no longer holds a LoRA expert (unplugged: its gate is disabled; the weights stay unread until
        the slot is written again)."""
        self.is_lora[slot] = False
        self.ranks[slot], self.scalings[slot] = {}, {}

    def read(self, slot: int, layers: Sequence[int], handle: LoraAdapter | None = None) -> LoraAdapter:
        """The slot's adapter copied back out (its layers in `layers` order)."""
        index = torch.tensor(list(layers), dtype=torch.long, device=self.device)
        return LoraAdapter(
            {
                p: LoraPair(
                    self.a[p][index, slot, :, :r].transpose(1, 2).contiguous(),
                    self.b[p][index, slot, :r].transpose(1, 2).contiguous(),
                    self.s[p][index, slot],
                )
                for p, r in self.ranks[slot].items()
            }
        )

    def layout(self, covered: Sequence[frozenset[int]], live: bool = False) -> LoraStacks | None:
        """The storage laid out for dispatch (views, plus a copy of the host facts and of is_lora); covered[c]: the
        layers slot c's expert covers. None when no slot holds a LoRA expert. (Always a copy of the host facts:
        a live set runs only kinds with a fixed-op form, never this one.)"""
        slots = [c for c in range(self.capacity) if self.ranks[c]]
        if not slots:
            return None
        on_layer = tuple(any(layer in covered[c] for c in slots) for layer in range(self.num_layers))
        early = [c for c in slots if any(is_attention_target(p) for p in self.ranks[c])]
        return LoraStacks(
            is_lora=self.is_lora.clone(),
            on_layer=on_layer,
            early=torch.tensor([c in early for c in range(self.capacity)], device=self.device) if early else None,
            early_on_layer=tuple(any(layer in covered[c] for c in early) for layer in range(self.num_layers)),
            pairs=_SlotPairs(self, [dict(r) for r in self.ranks], list(self.scalings), list(covered)),
            a=tuple({p: t[layer] for p, t in self.a.items()} for layer in range(self.num_layers)),
            b=tuple({p: t[layer] for p, t in self.b.items()} for layer in range(self.num_layers)),
            s=tuple({p: t[layer] for p, t in self.s.items()} for layer in range(self.num_layers)),
            # a slot that covers layers but holds no LoRA holds another kind's expert
            only_lora=all(ranks or not layers for ranks, layers in zip(self.ranks, covered, strict=True)),
        )

    def nbytes(self) -> int:
        tensors = [*self.a.values(), *self.b.values(), *self.s.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class LoraReferences:
    """LoRA experts by reference (sets built from experts: training, what-ifs): no slot copy; their LoraStacks are
    built from the experts' own tensors when the LoRA experts or the capacity changed."""

    def __init__(self, num_layers: int, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.num_layers, self.device, self.dtype = num_layers, device, dtype
        self.by_slot: list[tuple[tuple[int, ...], LoraAdapter] | None] = [None] * capacity
        self._stacks: LoraStacks | None = None
        self._stale = False

    def resize(self, capacity: int, rank: int = 0) -> None:
        self.by_slot.extend([None] * (capacity - len(self.by_slot)))
        self._stale = True

    def write(self, slot: int, layers: Sequence[int], adapter: object) -> None:
        if self.by_slot[slot] is not None or isinstance(adapter, LoraAdapter):
            self._stale = True
        self.by_slot[slot] = (tuple(layers), adapter) if isinstance(adapter, LoraAdapter) else None

    def forget(self, slot: int) -> None:
        if self.by_slot[slot] is not None:
            self.by_slot[slot], self._stale = None, True

    def read(self, slot: int, layers: Sequence[int], handle: LoraAdapter) -> LoraAdapter:
        return handle  # the expert's own tensors

    def layout(self, covered: Sequence[frozenset[int]], live: bool = False) -> LoraStacks | None:
        if self._stale:
            self._stacks = LoraStacks.build(self.by_slot, self.num_layers, self.device, self.dtype)
            self._stale = False
        return self._stacks

    def nbytes(self) -> int:
        return 0


class _SlotPairs(Sequence):
    """LoraStacks.pairs over slot storage: pairs[l][c] made on demand as views (no copy, no device read), from
    the host facts as they were when the snapshot was taken."""

    def __init__(
        self,
        storage: LoraSlots,
        ranks: list[dict[str, int]],
        scalings: list[dict[str, tuple[float, ...]]],
        layers: list[frozenset[int]],
    ) -> None:
        self._a, self._b = dict(storage.a), dict(storage.b)
        self._ranks, self._scalings, self._layers = ranks, scalings, layers
        self._count = storage.num_layers
        self._made: dict[tuple[int, int], dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None] = {}

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, layer: int) -> _SlotPairsRow:  # type: ignore[override]
        return _SlotPairsRow(self, layer)

    def pair_set(self, layer: int, c: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None:
        """Made once per (layer, slot) and kept: every projection of every step would otherwise slice anew."""
        key = (layer, c)
        if key not in self._made:
            ranks = self._ranks[c]
            self._made[key] = (
                None
                if not ranks or layer not in self._layers[c]
                else {
                    p: (self._a[p][layer, c, :, :r], self._b[p][layer, c, :r], self._scalings[c][p][layer])
                    for p, r in ranks.items()
                }
            )
        return self._made[key]


class _SlotPairsRow(Sequence):
    """One layer of _SlotPairs: row[c] is made when asked (a plan asks for the experts that won rows only)."""

    def __init__(self, pairs: _SlotPairs, layer: int) -> None:
        self._pairs, self._layer = pairs, layer

    def __len__(self) -> int:
        return len(self._pairs._ranks)

    def __getitem__(self, c: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None:  # type: ignore[override]
        return self._pairs.pair_set(self._layer, c)


def _grown(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """A zero tensor `size` long on `dim` (otherwise tensor's shape) with `tensor` copied into its start."""
    shape = list(tensor.shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    out.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return out


# --- one layer's plan --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LoraGroup:
    """The rows one LoRA expert won on a layer: rows [n], None when it won every row of a top-1 choice (a pinned
    batch: no index op at all); weight [n, 1] = 1/k' per row, None for top-1."""

    expert: int
    rows: torch.Tensor | None
    weight: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class LoraPlan:
    """What the projections of the layer being run add: grouped (`groups`) or gathered (`index` [N], the
    LoRA expert of each row, -1 for none)."""

    layer: int
    stacks: LoraStacks
    groups: tuple[LoraGroup, ...] = ()
    index: torch.Tensor | None = None

    def apply(self, projection: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x [..., in], out [..., out] (the projection's own output) -> out with the routed rows' deltas.

        Semantics (grouped): for each group g of expert e, for each row i in g.rows (every row when None):
            out[i] += scaling_e * weight_g[i] * B_e @ (A_e @ x[i])"""
        flat_x, flat = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        if self.index is not None:
            return self._gathered(projection, flat_x, flat).view_as(out)
        sites = self.stacks.pairs[self.layer]
        adapted = [(g, pair) for g in self.groups if (pair := (sites[g.expert] or {}).get(projection)) is not None]
        if not adapted:
            return out
        first, (a_t, b_t, scaling) = adapted[0]
        if first.rows is None and flat.dtype == flat_x.dtype == a_t.dtype:
            # one expert won every row (a pinned batch): out + s (x A^T) B^T in two matmuls, no index op
            return lora_delta(flat_x, a_t, b_t, scaling, base=flat).view_as(out)
        result = flat.clone()  # rows no LoRA won stay as the projection computed them, bit for bit
        for group, (a_t, b_t, scaling) in adapted:
            rows = group.rows if group.rows is not None else torch.arange(flat.shape[0], device=flat.device)
            delta = lora_delta(flat_x.index_select(0, rows), a_t, b_t, scaling)
            if group.weight is not None:
                delta = delta * group.weight
            result.index_add_(0, rows, delta.to(result.dtype))
        return result.view_as(out)

    def _gathered(self, projection: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if projection not in self.stacks.a[self.layer]:
            return out
        index = self.index.clamp(min=0)
        a_t = self.stacks.a[self.layer][projection][index]  # [N, in, R]
        b_t = self.stacks.b[self.layer][projection][index]  # [N, R, out]
        scaling = self.stacks.s[self.layer][projection][index]  # [N]
        delta = torch.bmm(torch.bmm(x[:, None], a_t), b_t)[:, 0]  # [N, out]
        delta = delta * scaling[:, None].to(delta.dtype)
        return torch.where((self.index >= 0)[:, None], out + delta.to(out.dtype), out)


def plan_lora(
    stacks: LoraStacks, layer: int, choice: torch.Tensor, gather: bool
) -> tuple[LoraPlan | None, torch.Tensor]:
    """Split a layer's choice [N, k] (expert indices, -1 empty) between the kinds.

    Returns (the LoRA plan, or None when no LoRA expert won a row; the choice with LoRA experts emptied,
    for bottleneck dispatch). gather: top-1 for few rows, no host read; else one host read here.
    """
    if stacks.only_lora:  # every choice is a LoRA expert's (or base): nothing left for the kinds after the block
        own, rest = choice, torch.full_like(choice, -1)
    else:
        lora = (choice >= 0) & stacks.is_lora[choice.clamp(min=0)]  # [N, k]
        own, rest = choice.masked_fill(~lora, -1), choice.masked_fill(lora, -1)
    if gather:
        return LoraPlan(layer, stacks, index=own[:, 0]), rest
    if choice.shape[1] == 1:
        flat = own[:, 0]
        counts = torch.bincount(flat + 1, minlength=len(stacks.is_lora) + 1).tolist()  # [none, e0, e1, ...]
        if counts[0] == flat.shape[0]:
            return None, rest
        if max(counts[1:]) == flat.shape[0]:  # one expert won every row (a pinned batch): no sort, no index
            return LoraPlan(layer, stacks, (LoraGroup(counts.index(flat.shape[0]) - 1, None, None),)), rest
        order = torch.argsort(flat, stable=True)
        groups, start = [], counts[0]
        for e, count in enumerate(counts[1:]):
            if count:
                groups.append(LoraGroup(e, order[start : start + count], None))
                start += count
        return LoraPlan(layer, stacks, tuple(groups)), rest
    tokens, slots = (own >= 0).nonzero(as_tuple=True)
    if tokens.numel() == 0:
        return None, rest
    experts = own[tokens, slots]
    order = torch.argsort(experts, stable=True)
    tokens, experts = tokens[order], experts[order]
    won, counts = torch.unique_consecutive(experts, return_counts=True)
    chosen = (choice >= 0).sum(dim=1).clamp(min=1)  # k' per row, every kind counted
    weights = (1.0 / chosen)[tokens, None]
    groups, start = [], 0
    for e, count in zip(won.tolist(), counts.tolist(), strict=True):
        groups.append(LoraGroup(e, tokens[start : start + count], weights[start : start + count]))
        start += count
    return LoraPlan(layer, stacks, tuple(groups)), rest


# --- the projection wrapper --------------------------------------------------------------------------------


class RoutedProjection(nn.Module):
    """Wraps one projection (nn.Linear or Conv1D; never edited, PEFT's `base_layer` habit). While its block
    runs with a LoRA plan on the step (`context.step.block_plan`), the routed rows get their deltas. `name`:
    its target name (moe.model.backbone.Family: `down_proj`, `self_attn.q_proj`)."""

    def __init__(self, base_layer: nn.Module, name: str, context) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self._context = context  # moe.model.routed's per-thread step context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        step = self._context.step
        plan = step.block_plan if step is not None else None
        return out if plan is None else plan.apply(self.name, x, out)


def wrap_projections(block: nn.Module, projections: Sequence[str], context) -> None:
    """Put each projection inside a RoutedProjection (in place; weights untouched). projections: paths from
    `block` (the MLP block's attributes; `self_attn.q_proj` from a decoder layer), each the target's name."""
    for name in projections:
        parent, _, attribute = name.rpartition(".")
        owner = block.get_submodule(parent) if parent else block
        setattr(owner, attribute, RoutedProjection(getattr(owner, attribute), name, context))


# --- the kind ---------------------------------------------------------------------------------------------


class Lora:
    """The LoRA kind (moe.adapters.kind.AdapterKind)."""

    name = NAME
    adapter = LoraAdapter
    shape_source = "lora targets"  # what its file's tensor shapes follow (error text)
    weight_names = "the LoRA A and B tensors"

    # --- the expert file: metadata `lora` (its targets), tensors lora.<p>.A / .B / .scaling ---

    def file_fields(self, adapter: LoraAdapter) -> dict[str, str]:
        return {"lora": json.dumps({"targets": adapter.targets()})}

    def parse_fields(self, metadata: Mapping[str, str]) -> dict[str, dict[str, int]]:
        return parse_targets(metadata.get("lora"))

    def check_rank(self, rank: int, fields: dict[str, dict[str, int]]) -> None:
        if rank != max(t["rank"] for t in fields.values()):
            raise InvalidMetadataError(f"metadata rank {rank} is not the largest LoRA target rank ({fields})")

    def file_shapes(
        self, fields: dict[str, dict[str, int]], layers: int, rank: int, backbone: BackboneFingerprint
    ) -> dict[str, tuple[int, ...]]:
        if backbone.family not in FAMILIES:
            raise InvalidMetadataError(f"LoRA expert for family {backbone.family!r}, which has no projection table")
        return file_shapes(layers, backbone.hidden_size, FAMILIES[backbone.family], fields)

    def is_float32(self, tensor_name: str) -> bool:
        return tensor_name.endswith(".scaling")

    def from_tensors(self, tensors: Mapping[str, torch.Tensor], fields: dict[str, dict[str, int]]) -> LoraAdapter:
        return LoraAdapter.from_tensors(tensors, list(fields))

    # --- the backbone ---

    def check_fits(self, name: str, adapter: LoraAdapter, projections: Mapping[str, tuple[int, int]] | None) -> None:
        check_fits(name, adapter, projections)

    def wrap_block(self, block: nn.Module, projections: Sequence[str], context: object) -> None:
        wrap_projections(block, projections, context)

    # --- slot storage ---

    def slot_rank(self, adapter: LoraAdapter) -> int:
        return 0  # its ranks are per projection, held by its own storage

    def slots(
        self, num_layers: int, hidden: int, capacity: int, rank: int, device: torch.device, dtype: torch.dtype
    ) -> LoraSlots:
        return LoraSlots(num_layers, capacity, device, dtype)

    def references(
        self, num_layers: int, hidden: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> LoraReferences:
        return LoraReferences(num_layers, capacity, device, dtype)


LORA = Lora()
