"""The routed model: a frozen backbone whose blocks are wrapped to add the experts the router picks.

    RoutedModel.forward(input_ids, routing=[RoutingSpec, ...])
      -> for each decoder layer l, RoutedAttention (only while an expert adapting attention covers l):
           early  = top-k eligible among those experts, scored on the attention input  # [N, k]
           attn   = the backbone's attention block, their LoRA deltas on their rows' q/k/v/o (so each token's
                    K/V enter the cache as its route made them)
         then RoutedMLP:
           scores = cos(x, keys[l]) + offsets[l]            # [N, C], moe.routing.router at the MLP input
                                                            #   (C = expert slots)
           choice = top-k eligible (score > threshold)      # [N, k], -1 = base route
           base   = mlp(x)                                  # the backbone block; the kinds run inside it add
                                                            #   their deltas on their rows (LoRA: its projections)
           out    = base + deltas of the kinds run after it # bottleneck; base rows untouched
                                                            #   (the stages: moe.adapters.dispatch)
      -> logits, and a routing trace counted on the device

Where the decision is taken. One decision per token per layer covers both blocks. An expert that adapts attention
must be decided before attention runs: the token's K/V are computed there and cached for every later token to
read, so a decision taken later could not put its q/k/v deltas in them. Its gate therefore reads the attention
block's input (the layer's normed hidden state), the earliest point the layer has; a token no such expert takes
goes on to the MLP input, where every other expert is decided exactly as before (the same gate input, the same
scores: an MLP-only expert's routing does not change). A set with no attention expert runs no early step at all.

Two dispatch paths, picked on the host from facts known before the step:
    decode  top-1, at most GATHER_MAX_TOKENS tokens, no gradient, slot storage: `routed_top1`, a fixed
            number of ops with no host read (what a captured decode step runs; on CUDA it can be
            torch.compile'd into a few fused kernels, see `fuse_decode_routing`); on CPU, when the step is
            neither captured nor compiled, `routed_top1_host_read`: one host read, no adapter when nothing routed
    grouped everything else (prefill, training, top-k), and every step while an expert of a kind without a
            fixed-op form is plugged (LoRA): tokens grouped by expert, one host read per layer (LoRA experts:
            moe.adapters.lora.plan_lora, gathered without a host read for few top-1 tokens)
The stages each layer runs are the plugged set's (`in_block`, `after_block`, `fixed`), resolved per snapshot from
the kind table: no lookup per layer.

The experts live in preallocated slots (moe.adapters.slots.ExpertSlots) written in place between steps; one
forward reads the plugged set once at its start.
"""

from __future__ import annotations

import array
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe.adapters.bottleneck import routed_rows_dispatch, slot_dispatch
from moe.adapters.expert import Expert
from moe.adapters.kind import KINDS
from moe.adapters.slots import ExpertSlots, PluggedSet
from moe.model.backbone import (
    attention_projection_shapes,
    decoder_layers,
    family_of,
    fingerprint,
    freeze,
    mlp_attribute,
    mlp_projection_shapes,
)
from moe.model.kv_cache import SlotCache, cache_kwarg
from moe.model.llama_decode import llama_decode_applies, llama_decode_forward, llama_decode_step_applies
from moe.model.trace import RoutingTrace, count_decisions
from moe.routing.context import ContextRouter
from moe.routing.router import RouterConfig, RoutingSpec, StepRouting, choose_experts, gate_scores, route_top1

# Decode steps (few tokens) take the fixed-op top-1 path over slot storage; above this many tokens (prefill)
# grouping by expert costs less than running or gathering adapters per token.
GATHER_MAX_TOKENS = 64


def routed_top1(
    x: torch.Tensor,
    base: torch.Tensor,
    keys: torch.Tensor,
    offsets: torch.Tensor,
    thresholds: torch.Tensor,
    covers: torch.Tensor,
    allowed: torch.Tensor | None,
    forced: torch.Tensor | None,
    keep: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    dispatch: Callable[..., torch.Tensor] = slot_dispatch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's decode routing: choice = route_top1(...) [N]; out = dispatch over the rows `keep` allows
    (None: all) -> (out [N, H], choice [N], what the trace counts). With slot_dispatch: no host read, a fixed
    op count (what a captured or compiled step runs). down, up: the layer's fixed-op operands (the plugged set's
    `fixed[layer]`: the bottleneck kind's slot storage, moe.adapters.bottleneck)."""
    choice = route_top1(x, keys, offsets, thresholds, covers, allowed, forced)
    applied = choice if keep is None else torch.where(keep, choice, -1)
    return dispatch(x, base, applied, down, up), choice


# routed_top1 with one host read per layer: no adapter runs when every row takes the base route, else only the slots
# that won rows (moe.adapters.bottleneck.routed_rows_dispatch; eager decode on CPU, where a read costs no device
# sync). The same results.
routed_top1_host_read = functools.partial(routed_top1, dispatch=routed_rows_dispatch)


@functools.cache
def fused_routed_top1() -> Callable:
    """routed_top1 torch.compile'd once per process (every RoutedModel shares it; a fresh torch.compile per
    call would recompile, and past dynamo's recompile limit run eagerly without a word). Dynamic shapes: one
    compiled graph serves every bucket size and slot capacity; the host-known variants (dense or gathered, which
    inputs are None) are a few more."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    return torch.compile(routed_top1, fullgraph=True, dynamic=True)


@dataclass
class RoutedOutput:
    logits: torch.Tensor
    past_key_values: object | None
    trace: RoutingTrace
    mlp_inputs: list[torch.Tensor] = field(default_factory=list)  # per layer [B, T, H] when captured
    context: torch.Tensor | None = None  # [B, L, H] float32 each row's running context sums after this forward
    # (token mode by the context router: moe.routing.context), None when the set has no context gates
    attention_inputs: list[torch.Tensor] = field(default_factory=list)  # per layer [B, T, H] when captured (what
    # the gate of an expert adapting attention reads)


@dataclass
class _Step:
    """What every RoutedMLP of one forward reads: the plugged set and per-token routing tensors."""

    plugged: PluggedSet
    top_k: int
    allowed: torch.Tensor | None  # [N, C] bool; None: every slot allowed on every token
    forced: torch.Tensor | None  # [N] long; None: no pins
    skip: torch.Tensor | None  # [N, 1] bool: scored but no expert run (observe rows, padding); None: none
    valid: torch.Tensor  # [N] float, 0 for padding
    flat_rows: torch.Tensor  # [N] long: the batch row of each token
    trace_rows: torch.Tensor | None  # [B, C + 1]; None where the step counts on the host (`host_choices`)
    trace_layers: torch.Tensor | None  # [L, C + 1]; likewise
    route: bool  # False: no expert can win anything this step, skip routing work
    capture: list[torch.Tensor] | None
    capture_attention: list[torch.Tensor] | None = None
    decode: Callable | None = None  # routed_top1 (or its compiled form) when the decode path applies
    dispatch: Callable | None = None  # with decode, for a set routed by its context gates: the dispatch after
    #   the context router's choice (slot_dispatch, or routed_rows_dispatch where decode reads the host)
    choices: list[torch.Tensor] = field(default_factory=list)  # per routed layer [N, k], counted once at the end
    block_plan: object | None = None  # the plan of the kind run inside the block (LoRA), set while the block runs
    early: torch.Tensor | None = None  # [N, k] the layer's choice before attention (RoutedAttention), for its MLP
    context: torch.Tensor | None = None  # [B, L, H] float32 running context sums, updated layer by layer (gates)
    counted: torch.Tensor | None = None  # [B, T] bool: positions that join the context (real, after the prefix)
    counted_weights: torch.Tensor | None = None  # [B, T] float32: counted as the weights its running sums add
    host_choices: list[list[int]] | None = None  # an eager decode step on CPU, one token per row, whose dispatch
    #   reads the choices (routed_rows_dispatch): each routed layer's choices [N] as read, counted on the host at the
    #   end (`_host_trace`, in place of count_decisions' ~60 ops); None: counted on the device (`choices`)
    counted_read: list[bool] | None = None  # with host_choices and context gates: counted[:, 0], read once
    context_layers: tuple[torch.Tensor, ...] = ()  # with those: context[:, l] per layer, views taken once
    every_counted: bool = False  # with those: every row counts (step_read then applies no weights)
    pins_only: bool = False  # host fact: no row may win an expert by its score (top-1): every route is a pin or
    #   base, so no gate is scored (`_pinned_choice`)


def _pinned_choice(forced: torch.Tensor, covers: torch.Tensor) -> torch.Tensor:
    """forced [N] (-1: no pin), covers [C] -> choice [N, 1]: each row's pinned expert where it covers the layer,
    else base. What choose_experts picks (top-1) when no row may win by its score: the scores are not needed."""
    return torch.where((forced >= 0) & covers[forced.clamp(min=0)], forced, -1)[:, None]


def _flat(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """t [B, T, H] -> [N, H] (a view when t is contiguous, as a block's input and output are: one op, not reshape's
    two)."""
    return t.view(-1, hidden) if t.is_contiguous() else t.reshape(-1, hidden)


class _Context(threading.local):
    """The step being run, per thread: the engine decodes while an admission report runs the same model."""

    step: _Step | None = None


def _gathers(choice: torch.Tensor, early: bool) -> bool:
    """Whether an in-block kind's plan for this choice [N, k] takes its gathered form (each row's weights gathered,
    no host read: what few top-1 rows on an accelerator want) rather than the grouped one. On CPU a host read costs
    nothing and gathering per-row weights costs more than the grouped matmuls, so a layer whose decision has an
    early step (an expert adapting attention) plans grouped; a layer without one keeps the gathered form, so the
    sets that held no attention expert decode bit for bit as they always did."""
    few = choice.shape[1] == 1 and choice.shape[0] <= GATHER_MAX_TOKENS and not torch.is_grad_enabled()
    return few and not (early and choice.device.type == "cpu")


class RoutedAttention(nn.Module):
    """Wraps one decoder layer's frozen attention block (never edited). While the plugged set holds an expert that
    adapts attention on this layer (PluggedSet.before_attention), it takes those experts' decision at the block's
    input and runs the block with their plan, so their q/k/v/o deltas are in the routed rows (and in the K/V the
    cache keeps); the decision goes on to RoutedMLP on the step (`early`). Otherwise the block as it is."""

    def __init__(self, base_layer: nn.Module, layer: int, context: _Context) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer = layer
        self._context = context

    def forward(self, *args, **kwargs):
        step = self._context.step
        if step is None:
            return self.base_layer(*args, **kwargs)
        x = args[0] if args else kwargs["hidden_states"]  # [B, T, H]: what the attention block reads
        if step.capture_attention is not None:
            step.capture_attention.append(x.detach())
        split = step.plugged.before_attention[self.layer] if step.route and step.plugged.before_attention else None
        if split is None:
            return self.base_layer(*args, **kwargs)
        flat_x = x.reshape(-1, x.shape[-1])
        plugged, layer = step.plugged, self.layer
        if step.pins_only:
            step.early = _pinned_choice(step.forced, split.covers)
        else:
            scores = gate_scores(F.normalize(flat_x, dim=-1), plugged.keys[layer], plugged.offsets[layer])  # [N, C]
            step.early = choose_experts(scores, split.thresholds, step.allowed, step.forced, split.covers, step.top_k)
        choice = step.early if step.skip is None else step.early.masked_fill(step.skip, -1)
        gather = _gathers(choice, early=True)
        for plan in split.plans:
            step.block_plan, choice = plan(layer, choice, gather)
            if step.block_plan is not None:
                break  # one in-block kind holds the early experts (LoRA)
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            step.block_plan = None


class RoutedMLP(nn.Module):
    """Wraps one decoder layer's frozen MLP block (PEFT's `base_layer` habit); the block is never edited."""

    def __init__(self, base_layer: nn.Module, layer: int, context: _Context) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer = layer
        self._context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = self._context.step
        if step is None:
            return self.base_layer(x)
        if step.capture is not None:
            step.capture.append(x.detach())
        if not step.route:
            return self.base_layer(x)
        hidden = x.shape[-1]
        plugged, layer = step.plugged, self.layer
        if step.decode is not None:  # every plugged expert's kind has the fixed-op form: the fixed-op path
            base = self.base_layer(x)
            flat_x, flat_base = _flat(x, hidden), _flat(base, hidden)
            keep = None if step.skip is None else ~step.skip[:, 0]
            if step.dispatch is not None:  # token mode by the context router: its choice, the same dispatch
                choice, read = self._context_decode(step, x, flat_x)
            else:  # the gates' choice
                gates = (
                    plugged.keys[layer],
                    plugged.offsets[layer],
                    plugged.thresholds[layer],
                    plugged.covers[layer],
                    step.allowed,
                    step.forced,
                )
                if step.host_choices is None:
                    out, choice = step.decode(flat_x, flat_base, *gates, keep, *plugged.fixed[layer])
                    step.choices.append(choice[:, None])
                    return out.view(base.shape)
                choice = route_top1(flat_x, *gates)  # routed_top1_host_read: its read kept for the trace
                read = choice.tolist()
            if read is None:  # counted on the device: the choice's dispatch (slot_dispatch in a fixed-op step)
                assert choice is not None
                step.choices.append(choice[:, None])
                applied = choice if keep is None else torch.where(keep, choice, -1)
                return step.dispatch(flat_x, flat_base, applied, *plugged.fixed[layer]).view(base.shape)
            step.host_choices.append(read)
            if keep is None:  # routed_rows_dispatch on this read (choice None: decided on the host, made if needed)
                return routed_rows_dispatch(flat_x, flat_base, choice, *plugged.fixed[layer], read).view(base.shape)
            if choice is None:
                choice = torch.tensor(read, device=flat_x.device)
            applied = torch.where(keep, choice, -1)  # rows kept out take base: the dispatch reads what applies
            return routed_rows_dispatch(flat_x, flat_base, applied, *plugged.fixed[layer]).view(base.shape)
        flat_x = x.reshape(-1, hidden)
        early, step.early = step.early, None
        split = plugged.before_attention[layer] if early is not None else None
        # the experts decided before attention are out of this decision (split: their columns closed)
        thresholds = plugged.thresholds[layer] if split is None else split.late_thresholds
        covers = plugged.covers[layer] if split is None else split.late_covers
        if step.pins_only and (plugged.gates is None or step.context is None):
            # every route a pin: the early step's pins are among these (split.covers is part of covers[layer])
            choice = _pinned_choice(step.forced, plugged.covers[layer])
            early = None
        elif plugged.gates is not None and step.context is not None:  # the context router's token classifier
            # among the classes not decided before attention (those experts took their tokens by their gates):
            # a token the router would give one goes to the most probable of the rest (docs/routing.md)
            allowed = step.allowed
            if split is not None:
                allowed = split.late_allowed[None] if allowed is None else allowed & split.late_allowed
            choice = self._context_choice(step, x, allowed, covers)[:, None]  # [N, 1]
        else:
            scores = gate_scores(F.normalize(flat_x, dim=-1), plugged.keys[layer], plugged.offsets[layer])  # [N, E]
            choice = choose_experts(scores, thresholds, step.allowed, step.forced, covers, step.top_k)  # [N, k]
        if early is not None:  # a token an early expert took keeps that route, for this block too
            choice = torch.where((early >= 0).any(dim=1, keepdim=True), early, choice)
        step.choices.append(choice)
        if step.skip is not None:
            choice = choice.masked_fill(step.skip, -1)
        # the kinds run inside the block (LoRA): the layer's plan, read by the block's modules while it runs; the
        # kinds run after it dispatch on the rest of the choice (chosen: k' per row, every kind counted)
        chosen = None
        for stage in plugged.in_block:
            if stage.on_layer[layer]:
                gather = _gathers(choice, early=split is not None)
                if chosen is None and choice.shape[1] > 1:
                    chosen = (choice >= 0).sum(dim=1)
                step.block_plan, choice = stage.plan(layer, choice, gather)
        try:
            base = self.base_layer(x)
        finally:
            step.block_plan = None
        stages = plugged.after_block
        if not stages:
            return base
        if stages[0].own is None:  # one kind after the block (the usual case): its choices are the rest
            stage = stages[0]
            return stage.delta(flat_x, base.reshape(-1, hidden), choice, stage.layers[layer], chosen).view_as(base)
        if chosen is None and choice.shape[1] > 1:
            chosen = (choice >= 0).sum(dim=1)
        out = base.reshape(-1, hidden)
        for stage in stages:  # several kinds after the block: each runs its own experts' choices
            own = choice.masked_fill(~stage.own[choice.clamp(min=0)], -1)
            out = stage.delta(flat_x, out, own, stage.layers[layer], chosen)
        return out.view_as(base)

    def _context_decode(
        self, step: _Step, x: torch.Tensor, flat_x: torch.Tensor
    ) -> tuple[torch.Tensor | None, list[int] | None]:
        """A decode-path choice by the context router (token mode; x [B, T, H], flat_x [N, H]) -> (choice [N] or
        None, its host read or None). Where the step counts on the host (`host_choices`: one token per row) the
        read is there: for a batch with no allow-lists or pins, decided on the host by `ContextGates.step_read` (no
        device choice: None), else `step` and a read of it. Elsewhere the device choice alone."""
        gates = step.plugged.gates
        assert gates is not None and step.context is not None
        if step.host_choices is not None and step.allowed is None and step.forced is None:
            assert step.counted_read is not None
            sums = step.context_layers[self.layer]
            weights = None if step.every_counted else step.counted_weights
            return None, gates.step_read(sums, self.layer, flat_x, step.counted_read, weights)
        covers = None if step.forced is None else step.plugged.covers[self.layer]  # what a pin may use
        choice = self._context_choice(step, x, step.allowed, covers)
        return choice, (choice.tolist() if step.host_choices is not None else None)

    def _context_choice(
        self, step: _Step, x: torch.Tensor, allowed: torch.Tensor | None, covers: torch.Tensor | None
    ) -> torch.Tensor:
        """x [B, T, H] -> choice [N]: each token's layer context (the row's running sum of unit inputs, this token
        included) classified by the set's gates; the row's sum moves on to the last position (in place)."""
        assert step.context is not None and step.counted is not None and step.plugged.gates is not None
        return step.plugged.gates.step(
            step.context, self.layer, x, step.counted, allowed, step.forced, covers, step.counted_weights
        )


class RoutedModel(nn.Module):
    """A frozen causal LM with routed, hot-pluggable experts on its MLP blocks."""

    def __init__(self, backbone: nn.Module, router: RouterConfig | None = None) -> None:
        super().__init__()
        self.backbone = freeze(backbone)
        self.router = router or RouterConfig()
        self.fingerprint = fingerprint(backbone)  # before wrapping: hashes the plain backbone's names
        layers = decoder_layers(backbone)
        attr = mlp_attribute(backbone)
        self._context = _Context()
        self.mlps: list[RoutedMLP] = []
        self.attentions: list[RoutedAttention] = []
        family = family_of(backbone)
        self.projection_shapes = mlp_projection_shapes(backbone)  # {name: (in, out)} of the MLP's projections
        # {target: (in, out)}: every projection a LoRA expert may adapt (MLP, then `self_attn.q_proj`...)
        self.target_shapes = {**self.projection_shapes, **attention_projection_shapes(backbone)}
        for index, layer in enumerate(layers):
            block = getattr(layer, attr)
            for kind in KINDS.values():  # the kinds run inside a block wrap its modules (LoRA: its projections)
                kind.wrap_block(block, family.projections, self._context)
                kind.wrap_block(layer, family.attention_targets, self._context)
            wrapper = RoutedMLP(block, index, self._context)
            setattr(layer, attr, wrapper)
            self.mlps.append(wrapper)
            attention = RoutedAttention(getattr(layer, family.attention), index, self._context)
            setattr(layer, family.attention, attention)
            self.attentions.append(attention)
        # where the backbone lives, fixed here: the expert slots are allocated there, and the model is not moved
        # after wrapping (moe.model.backbone moves the backbone before)
        param = next(backbone.parameters())
        self.device: torch.device = param.device
        # eager CPU decode steps of a Llama-family backbone (llama, qwen2, mistral) run written out
        # (moe.model.llama_decode); False: transformers' forward for every step (the reference it is checked against)
        self._llama_decode = llama_decode_applies(backbone)
        self.dtype: torch.dtype = param.dtype
        self.num_layers = len(self.mlps)
        self.hidden_size = int(backbone.config.hidden_size)
        self.slots = ExpertSlots(
            self.num_layers, self.hidden_size, self.device, self.dtype, projections=self.target_shapes
        )
        # the current set: a reference taken once stays valid and unchanged for as long as it is held. Assigned
        # (one atomic store) by each call below that changes the slots, under the swap lock; read without it
        self.plugged: PluggedSet = self.slots.snapshot()
        self.cache_kwarg = cache_kwarg(backbone)
        self.decode_route: Callable = routed_top1
        self._swap_lock = threading.Lock()

    # --- the plugged set ------------------------------------------------------------------------------

    def plug(self, expert: Expert, replace: bool = False) -> PluggedSet:
        """Write an expert into a free slot (or over the one of the same name, with replace); applies from the
        next forward. Costs one expert's weights, whatever the number plugged."""
        with self._swap_lock:
            self.plugged = self.slots.plug(expert, replace=replace)
            return self.plugged

    def set_experts(self, experts: tuple[Expert, ...]) -> PluggedSet:
        """Make the plugged set exactly these experts in this order; experts already plugged (the same handle)
        keep their slots untouched, the others are written into slots. Applies from the next forward."""
        with self._swap_lock:
            self.plugged = self.slots.set_all(experts)
            return self.plugged

    def unplug(self, name: str) -> Expert:
        """Disable the expert's slot; returns it (a weightless handle: its name, shapes and metadata)."""
        with self._swap_lock:
            expert = self.slots.unplug(name)
            self.plugged = self.slots.snapshot()
            return expert

    def offer_router(self, router: ContextRouter) -> None:
        """Keep a context router fitted for a set (moe.admission.router_fit): the set of exactly those experts is
        published with it, now if it is the current one, else from the plug or swap that makes it current."""
        with self._swap_lock:
            self.slots.offer_router(router)
            self.plugged = self.slots.snapshot()

    def fuse_decode_routing(self, enabled: bool = True) -> None:
        """Run the decode routing of each layer as one torch.compile'd function (a few fused kernels on CUDA,
        where launches are what routing costs). Off: the plain torch ops, as on CPU."""
        if not enabled:
            self.decode_route = routed_top1
            return
        self.decode_route = fused_routed_top1()

    # --- forward --------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        routing: StepRouting | list[RoutingSpec] | None = None,
        plugged: PluggedSet | None = None,
        past_key_values: object | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        capture_mlp_inputs: bool = False,
        capture_attention_inputs: bool = False,
        logits_to_keep: int = 0,
        token_mask: torch.Tensor | None = None,
        fixed_ops: bool = False,
        context: torch.Tensor | None = None,
    ) -> RoutedOutput:
        """input_ids [B, T]; attention_mask [B, S] over cache + new tokens (1 = real token), or a 4D additive
        mask [B, 1, T, S] (then token_mask [B, T] says which new tokens are real; default all).

        routing: one RoutingSpec per row (default: token mode for every row) or a prepared StepRouting.
        plugged: the set to use (default: the current one, read once here).
        past_key_values: a transformers Cache, written in place (passed under the name the installed
            transformers takes).
        logits_to_keep: 0 for logits at every position, n for the last n only (prefill needs 1).
        fixed_ops: take the decode path with no host read whatever the token count, where it applies (top-1,
            slot storage, no gradient): what a captured or compiled decode step needs. Without it, a few tokens
            on CPU take the decode path with one host read per layer (only the slots that won rows run).
        context: [B, L, H] float32, each row's running context sums so far (a decode step: the decoder's
            buffer, updated in place; every real token counts); None: the rows start here (prefill: each row's
            first `skip` real tokens, the special prefix, stay out). Read only while the set has context gates
            (PluggedSet.gates: token mode routes by the context router, top-1); the sums after the forward are
            RoutedOutput.context.
        """
        plugged = plugged if plugged is not None else self.plugged
        batch, length = input_ids.shape
        if token_mask is None and attention_mask is not None and attention_mask.ndim == 2:
            token_mask = attention_mask[:, -length:]
        if routing is None:
            routing = [RoutingSpec()] * batch
        if not isinstance(routing, StepRouting):
            routing = StepRouting.from_specs(routing, plugged)
        self._context.step = self._prepare(plugged, routing, token_mask, batch, length, capture_mlp_inputs, fixed_ops)
        if capture_attention_inputs:
            self._context.step.capture_attention = []
        if plugged.gates is not None and self.router.top_k == 1:
            step = self._context.step
            step.context, step.counted = self._context_rows(plugged, token_mask, batch, length, context)
            step.counted_weights = step.counted.float()  # once here, not once per layer
            if step.host_choices is not None:  # what step_read takes: read and views made once, not per layer
                step.counted_read = step.counted.view(-1).tolist()
                step.context_layers = step.context.unbind(dim=1)  # per layer [B, H], views of the rows' state
                step.every_counted = all(step.counted_read)
        cache = {self.cache_kwarg: past_key_values} if past_key_values is not None else {}
        step = self._context.step
        try:
            if (
                self._llama_decode
                and position_ids is not None
                and step.capture_attention is None
                and not (step.route and plugged.before_attention)  # experts decided at the attention input
                and llama_decode_step_applies(self.backbone, input_ids, attention_mask, past_key_values, logits_to_keep)
            ):  # an eager CPU decode step of a Llama-family backbone, written out (moe.model.llama_decode)
                assert attention_mask is not None and isinstance(past_key_values, SlotCache)
                logits = llama_decode_forward(self.backbone, input_ids, position_ids, attention_mask, past_key_values)
            else:
                logits = self.backbone(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=use_cache,
                    logits_to_keep=logits_to_keep,
                    **cache,
                ).logits
        finally:
            step, self._context.step = self._context.step, None
        if step.host_choices is not None:
            step.trace_rows, step.trace_layers = self._host_trace(step.host_choices, step.valid, plugged.capacity)
        else:
            count_decisions(step.choices, step.valid, step.flat_rows, step.trace_rows, step.trace_layers)
        if not step.route:
            # nothing could route: every real token took the base route on every layer
            valid_per_row = step.valid.view(batch, length).sum(dim=1)
            step.trace_rows[:, -1] = valid_per_row * self.num_layers
            step.trace_layers[:, -1] = valid_per_row.sum()
        trace = RoutingTrace(plugged.columns, step.trace_rows, step.trace_layers)
        return RoutedOutput(
            logits,
            past_key_values if use_cache else None,
            trace,
            step.capture or [],
            step.context,
            step.capture_attention or [],
        )

    def _host_trace(
        self, choices: list[list[int]], valid: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """count_decisions for a step of one token per row, from each routed layer's choices as read on the host
        (choices[l][n]: row n's slot, -1 = base; valid [N], read here once) -> (rows [B, C + 1], layers [L, C + 1]),
        the same counts: per row and per layer, each decision adds the row's valid weight to its slot's column,
        base last. Semantics:

            for l, read in enumerate(choices): for n, slot in enumerate(read):
                rows[n, slot] += valid[n]; layers[l, slot] += valid[n]      # slot -1: the base column

        Counted in float32 arrays that become the tensors without a copy (torch.frombuffer: a tensor from a list
        of floats costs more than the counting); counts are whole numbers, exact as count_decisions' float32 sums.
        """
        assert self.device.type == "cpu"  # only eager CPU steps read their choices
        weights = valid.tolist()
        width = capacity + 1
        rows = array.array("f", bytes(4 * width * len(weights)))
        layers = array.array("f", bytes(4 * width * self.num_layers))
        for layer, read in enumerate(choices):
            first = layer * width
            for row, (slot, weight) in enumerate(zip(read, weights, strict=True)):
                column = slot if slot >= 0 else capacity
                rows[row * width + column] += weight
                layers[first + column] += weight
        return (
            torch.frombuffer(rows, dtype=torch.float32).view(len(weights), width),
            torch.frombuffer(layers, dtype=torch.float32).view(self.num_layers, width),
        )

    def _context_rows(
        self,
        plugged: PluggedSet,
        token_mask: torch.Tensor | None,
        batch: int,
        length: int,
        context: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The running context sums a forward updates ([B, L, H]: the caller's, or zeros) and which positions
        count ([B, T] bool: real tokens, and when the rows start here, only those after the special prefix)."""
        device = self.device
        real = torch.ones(batch, length, dtype=torch.bool, device=device) if token_mask is None else token_mask.bool()
        if context is not None:
            return context, real
        assert plugged.gates is not None
        index = real.long().cumsum(dim=1) - 1  # [B, T]: each real token's index in its row
        counted = real & (index >= plugged.gates.skip)
        return torch.zeros(batch, self.num_layers, self.hidden_size, device=device), counted

    def _prepare(
        self,
        plugged: PluggedSet,
        routing: StepRouting,
        token_mask: torch.Tensor | None,
        batch: int,
        length: int,
        capture: bool,
        fixed_ops: bool = False,
    ) -> _Step:
        device, columns = self.device, plugged.capacity
        tokens = batch * length
        rows = torch.arange(batch, device=device)  # [B]
        if length > 1:
            rows = rows.repeat_interleave(length)  # [N]: the batch row of each token
        valid = token_mask.reshape(-1).float() if token_mask is not None else torch.ones(tokens, device=device)
        simple = routing.all_token_mode
        skip = None
        if not routing.applies_everywhere or (token_mask is not None and length > 1):  # observe rows, padding
            apply = routing.apply if length == 1 else routing.apply[rows]
            skip = ~(apply & (valid > 0))[:, None]
        per_token = (lambda t: t) if length == 1 else (lambda t: t[rows])  # decode: rows are the tokens
        decode = dispatch = host_choices = None
        if (
            self.router.top_k == 1
            and plugged.fixed is not None  # every expert's kind has the fixed-op form (LoRA: the grouped path)
            and (tokens <= GATHER_MAX_TOKENS or fixed_ops)
            and not torch.is_grad_enabled()
        ):
            host_read = not fixed_ops and device.type == "cpu" and self.decode_route is routed_top1
            decode = routed_top1_host_read if host_read else self.decode_route
            if plugged.gates is not None:  # token mode by the context router's gates: their choice, then dispatch
                dispatch = routed_rows_dispatch if device.type == "cpu" and not fixed_ops else slot_dispatch
            # every layer's dispatch reads its choices: count them on the host from those reads (one token per row)
            reads = dispatch is routed_rows_dispatch if dispatch is not None else decode is routed_top1_host_read
            if reads and length == 1 and routing.routes_anything:
                host_choices = []
        # on the grouped path on CPU, where a read costs no sync (never in a fixed-op step): whether no row may win
        # by its score, so the layers score no gate (a pinned batch: every route is its pin)
        pins_only = (
            decode is None
            and not fixed_ops
            and self.router.top_k == 1
            and not simple
            and device.type == "cpu"
            and routing.routes_anything
            and not bool(routing.allowed.any())
        )
        return _Step(
            plugged=plugged,
            top_k=self.router.top_k,
            allowed=None if simple else per_token(routing.allowed),
            forced=None if simple else per_token(routing.forced),
            skip=skip,
            valid=valid,
            flat_rows=rows,
            trace_rows=None if host_choices is not None else torch.zeros(batch, columns + 1, device=device),
            trace_layers=None if host_choices is not None else torch.zeros(self.num_layers, columns + 1, device=device),
            route=routing.routes_anything,
            capture=[] if capture else None,
            decode=decode,
            dispatch=dispatch,
            pins_only=pins_only,
            host_choices=host_choices,
        )
