"""The routed model: a frozen backbone whose MLP blocks are wrapped to add the experts the router picks.

    RoutedModel.forward(input_ids, routing=[RoutingSpec, ...])
      -> for each decoder layer l, RoutedMLP:
           scores = cos(x, keys[l]) + offsets[l]            # [N, E], moe.router, at the MLP input
           choice = top-k eligible (score > threshold)      # [N, k], -1 = base route
           base   = mlp(x)                                  # the backbone block; its projections add the
                                                            #   LoRA experts' deltas on their rows (moe.lora)
           out    = base + grouped adapter deltas            # moe.dispatch (bottleneck experts), base rows untouched
      -> logits, cache, and a routing trace counted on the device

One forward reads the plugged set once at its start, so plugging during a step cannot mix two sets.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe.backbone import decoder_layers, family_of, fingerprint, freeze, mlp_attribute, mlp_projection_shapes
from moe.dispatch import gathered_dispatch, grouped_dispatch
from moe.expert import Expert
from moe.lora import LoraPlan, plan_lora, wrap_projections
from moe.plugged import PluggedSet
from moe.router import RouterConfig, RoutingSpec, StepRouting, choose_experts, gate_scores
from moe.trace import RoutingTrace, count_decisions

# Decode steps (few tokens) gather each token's adapter weights and skip the host read that grouping needs;
# above this many tokens (prefill), gathering copies more weights than grouping costs.
GATHER_MAX_TOKENS = 64


@dataclass
class RoutedOutput:
    logits: torch.Tensor
    past_key_values: object | None
    trace: RoutingTrace
    mlp_inputs: list[torch.Tensor] = field(default_factory=list)  # per layer [B, T, H] when captured


@dataclass
class _Step:
    """What every RoutedMLP of one forward reads: the plugged set and per-token routing tensors."""

    plugged: PluggedSet
    top_k: int
    allowed: torch.Tensor | None  # [N, E] bool; None: every expert allowed on every token
    forced: torch.Tensor | None  # [N] long; None: no pins
    skip: torch.Tensor | None  # [N, 1] bool: scored but no expert run (observe rows, padding); None: none
    valid: torch.Tensor  # [N] float, 0 for padding
    flat_rows: torch.Tensor  # [N] long: the batch row of each token
    trace_rows: torch.Tensor  # [B, E + 1]
    trace_layers: torch.Tensor  # [L, E + 1]
    route: bool  # False: no expert can win anything this step, skip routing work
    capture: list[torch.Tensor] | None
    choices: list[torch.Tensor] = field(default_factory=list)  # per routed layer [N, k], counted once at the end
    lora_plan: LoraPlan | None = None  # --- LoRA experts: the layer's LoRA plan, set while its MLP block runs ---


class _Context(threading.local):
    """The step being run, per thread: the engine decodes while an admission report runs the same model."""

    step: _Step | None = None


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
        flat_x = x.reshape(-1, hidden)
        plugged, layer = step.plugged, self.layer
        scores = gate_scores(F.normalize(flat_x, dim=-1), plugged.keys[layer], plugged.offsets[layer])  # [N, E]
        choice = choose_experts(
            scores, plugged.thresholds[layer], step.allowed, step.forced, plugged.covers[layer], step.top_k
        )  # [N, k]
        step.choices.append(choice)
        if step.skip is not None:
            choice = choice.masked_fill(step.skip, -1)
        gather = choice.shape[1] == 1 and choice.shape[0] <= GATHER_MAX_TOKENS and not torch.is_grad_enabled()
        # --- LoRA experts (moe.lora): the layer's LoRA plan, read by the block's projections while it runs;
        # the bottleneck experts dispatch on the rest of the choice ---
        chosen = None
        if plugged.lora is not None and plugged.lora.on_layer[layer]:
            chosen = (choice >= 0).sum(dim=1) if choice.shape[1] > 1 else None
            step.lora_plan, choice = plan_lora(plugged.lora, layer, choice, gather)
        try:
            base = self.base_layer(x)
        finally:
            step.lora_plan = None
        if plugged.lora is not None and not plugged.has_bottleneck:
            return base
        flat_base = base.reshape(-1, hidden)
        if gather:
            out = gathered_dispatch(flat_x, flat_base, choice[:, 0], plugged.down_stack[layer], plugged.up_stack[layer])
        else:
            out = grouped_dispatch(flat_x, flat_base, choice, plugged.adapters[layer], chosen)
        return out.view_as(base)


class RoutedModel(nn.Module):
    """A frozen causal LM with routed, hot-pluggable experts on its MLP blocks."""

    def __init__(self, backbone: nn.Module, router: RouterConfig | None = None) -> None:
        super().__init__()
        self.backbone = freeze(backbone)
        self.router = router or RouterConfig()
        self.fingerprint = fingerprint(backbone)  # before wrapping: hashes the plain backbone's names
        layers = decoder_layers(backbone)
        attr = mlp_attribute(backbone)
        self.projection_shapes = mlp_projection_shapes(backbone)  # {name: (in, out)}: what LoRA experts adapt
        self._context = _Context()
        self.mlps: list[RoutedMLP] = []
        for index, layer in enumerate(layers):
            block = getattr(layer, attr)
            wrap_projections(block, family_of(backbone).projections, self._context)  # LoRA experts' hook
            wrapper = RoutedMLP(block, index, self._context)
            setattr(layer, attr, wrapper)
            self.mlps.append(wrapper)
        param = next(backbone.parameters())
        self._plugged = PluggedSet.empty(
            len(layers), self.hidden_size, param.device, param.dtype, projections=self.projection_shapes
        )
        self._swap_lock = threading.Lock()

    # --- the plugged set ------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.mlps)

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def plugged(self) -> PluggedSet:
        """The current set; a reference taken once stays valid and unchanged for as long as it is held."""
        return self._plugged

    def plug(self, expert: Expert, replace: bool = False) -> PluggedSet:
        """Add an expert (or swap one of the same name, with replace); applies from the next forward."""
        expert = expert.to(self.device, self.dtype)
        with self._swap_lock:
            self._plugged = self._plugged.plugging(expert, replace=replace)
            return self._plugged

    def set_experts(self, experts: tuple[Expert, ...]) -> PluggedSet:
        """Swap the whole plugged set for these experts in this order; experts already plugged are kept as
        they are (not copied). Applies from the next forward."""
        current = self._plugged.experts
        moved = tuple(e if any(e is p for p in current) else e.to(self.device, self.dtype) for e in experts)
        with self._swap_lock:
            self._plugged = self._plugged.replacing_all(moved)
            return self._plugged

    def unplug(self, name: str) -> Expert:
        with self._swap_lock:
            expert = self._plugged.get(name)
            self._plugged = self._plugged.unplugging(name)
            return expert

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
        logits_to_keep: int = 0,
    ) -> RoutedOutput:
        """input_ids [B, T]; attention_mask [B, S] over cache + new tokens (1 = real token).

        routing: one RoutingSpec per row (default: token mode for every row) or a prepared StepRouting.
        plugged: the set to use (default: the current one, read once here).
        logits_to_keep: 0 for logits at every position, n for the last n only (prefill needs 1).
        """
        plugged = plugged if plugged is not None else self._plugged
        batch, length = input_ids.shape
        token_mask = attention_mask[:, -length:].bool() if attention_mask is not None else None
        if routing is None:
            routing = [RoutingSpec()] * batch
        if not isinstance(routing, StepRouting):
            routing = StepRouting.from_specs(routing, plugged)
        self._context.step = self._prepare(plugged, routing, token_mask, batch, length, capture_mlp_inputs)
        try:
            out = self.backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
            )
        finally:
            step, self._context.step = self._context.step, None
        count_decisions(step.choices, step.valid, step.flat_rows, step.trace_rows, step.trace_layers)
        if not step.route:
            # nothing could route: every real token took the base route on every layer
            valid_per_row = step.valid.view(batch, length).sum(dim=1)
            step.trace_rows[:, -1] = valid_per_row * self.num_layers
            step.trace_layers[:, -1] = valid_per_row.sum()
        trace = RoutingTrace(plugged.names, step.trace_rows, step.trace_layers)
        return RoutedOutput(out.logits, out.past_key_values if use_cache else None, trace, step.capture or [])

    def _prepare(
        self,
        plugged: PluggedSet,
        routing: StepRouting,
        token_mask: torch.Tensor | None,
        batch: int,
        length: int,
        capture: bool,
    ) -> _Step:
        device, experts = self.device, len(plugged)
        rows = torch.arange(batch, device=device).repeat_interleave(length)  # [N]
        valid = token_mask.reshape(-1).float() if token_mask is not None else torch.ones(batch * length, device=device)
        simple = routing.all_token_mode
        skip = None
        if token_mask is not None or not routing.applies_everywhere:
            skip = ~(routing.apply[rows] & (valid > 0))[:, None]
        return _Step(
            plugged=plugged,
            top_k=self.router.top_k,
            allowed=None if simple else routing.allowed[rows],
            forced=None if simple else routing.forced[rows],
            skip=skip,
            valid=valid,
            flat_rows=rows,
            trace_rows=torch.zeros(batch, experts + 1, device=device),
            trace_layers=torch.zeros(self.num_layers, experts + 1, device=device),
            route=routing.routes_anything,
            capture=[] if capture else None,
        )
