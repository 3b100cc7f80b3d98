"""Prefill: prompts run together under their routing, each row's next-token logits and keys and values kept.

    prefill(model, prompts, specs)             -> Prefill: each row's next-token logits, its final RoutingSpec
                                                  and its prompt's keys and values (sequence mode decided here);
                                                  with prompt_logits=True also every prompt position's logits
                                                  (prompt logprobs, `echo`), else only the last position's
    prefill_rows(model, prompts, specs)        the one forward it is built from
    decide_routes(model, prompts, specs)       the route sequence mode keeps for each prompt

Sequence mode's protocol, in one place: a row in `sequence` mode without a decision is first prefilled
*observed* (scored and traced on the plain backbone, no expert applied), one route is picked from it, and
the row is prefilled again with that expert; a row that chose base keeps the observed keys and values, which
are exactly the backbone's. The route: the plugged set's context router (moe.routing.context, fitted on the
plugged experts' domain samples, PluggedSet.context) on the prompt's MLP inputs; for a set without a fitted
router (e.g. experts without domain texts, or nobody fitted one) `decide_sequence` on the cosine gates' counts.

A prefilled row joins a moe.decode.static_decoder.StaticDecoder slot; moe.decode.scheduler decides when.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from moe.adapters.expert import BASE_ROUTE
from moe.adapters.slots import PluggedSet
from moe.model.kv_cache import dynamic_layers_kv
from moe.model.routed import RoutedModel
from moe.model.trace import add_counts
from moe.routing.router import RoutingSpec, StepRouting, decide_sequence


@dataclass
class StepOutput:
    """What one forward produced for its rows: each row's next-token logits and its routing decisions."""

    logits: torch.Tensor  # [B, V], the last position of each row
    row_counts: list[dict[str, float]]  # per row {expert: decisions, ..., 'base': decisions}
    layer_counts: list[dict[str, float]]  # per layer, summed over rows
    all_logits: torch.Tensor | None = None  # [B, T, V] every position's logits (left-padded), when asked
    mlp_inputs: list[torch.Tensor] = field(default_factory=list)  # per layer [B, T, H] (left-padded), when asked


@dataclass
class PromptKV:
    """One prefill forward's keys and values: per layer [B, kv, T, D], rows left-padded to T."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    lengths: list[int]  # real tokens of each row (its last lengths[i] columns)
    context: torch.Tensor | None = None  # [B, L, H] each row's running context sums (token mode's context gates)

    def row(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row i's real columns, per layer (keys, values) [kv, T_i, D]."""
        n = self.lengths[i]
        return [(k[i, :, k.shape[2] - n :], v[i, :, v.shape[2] - n :]) for k, v in self.layers]


@dataclass
class Prefill:
    """Prompts prefilled together, in the caller's row order."""

    logits: torch.Tensor  # [B, V]: each row's next-token logits
    specs: list[RoutingSpec]  # each row's spec to decode with (sequence-mode decisions made)
    row_counts: list[dict[str, float]]  # decisions applied to each row's prompt
    layer_counts: list[dict[str, float]]  # per layer, applied decisions summed over rows
    sources: list[tuple[PromptKV, int]] = field(default_factory=list)  # where each row's keys and values are
    prompt_logits: list[torch.Tensor] | None = None  # per row [T_i, V], when prefill was asked for them

    def __len__(self) -> int:
        return len(self.specs)

    def length(self, row: int) -> int:
        kv, i = self.sources[row]
        return kv.lengths[i]

    def row_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        kv, i = self.sources[row]
        return kv.row(i)

    def row_context(self, row: int) -> torch.Tensor | None:
        """[L, H] the row's running context sums after its prompt (None: its set had no context gates)."""
        kv, i = self.sources[row]
        return None if kv.context is None else kv.context[i]


def prefill_rows(
    model: RoutedModel,
    prompts: list[list[int]],
    specs: list[RoutingSpec],
    plugged: PluggedSet | None = None,
    observe: list[bool] | None = None,
    all_logits: bool = False,
    capture: bool = False,
) -> tuple[PromptKV, StepOutput]:
    """Run the prompts (left-padded to the longest) under their specs as given, and keep their keys and values.

    observe[i]: score and trace row i on the plain backbone without applying experts, so its keys and values
    are the exact backbone's. all_logits: keep every position's logits (StepOutput.all_logits), not only the
    last. capture: keep every layer's MLP inputs (StepOutput.mlp_inputs). `prefill` below is what callers use;
    this is its building block.
    """
    plugged = plugged if plugged is not None else model.plugged
    device = model.device
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, longest - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, T]: real tokens count 0, 1, ... per row
    routing = StepRouting.from_specs(specs, plugged, observe=observe)
    cache = DynamicCache()
    with torch.inference_mode():
        # logits_to_keep=1: sampling needs only the last position's logits, not [B, T, V]
        out = model(
            ids,
            attention_mask=mask,
            routing=routing,
            plugged=plugged,
            past_key_values=cache,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            capture_mlp_inputs=capture,
        )
    step = StepOutput(
        out.logits[:, -1, :],
        out.trace.row_counts(),
        out.trace.layer_counts(),
        all_logits=out.logits if all_logits else None,
        mlp_inputs=out.mlp_inputs,
    )
    return PromptKV(dynamic_layers_kv(cache), [len(p) for p in prompts], out.context), step


def _decide(
    out: StepOutput, plugged: PluggedSet, model: RoutedModel, prompts: list[list[int]], specs: Sequence[RoutingSpec]
) -> list[str]:
    """Each observed row's route: the set's context router on the prompt's MLP inputs (its features at the
    last token), or, for a set without one, the most-chosen expert of the cosine gates' counts."""
    if plugged.context is None:
        return [decide_sequence(counts, plugged.names, model.router.sequence_min_share) for counts in out.row_counts]
    routes = []
    for row, (prompt, spec) in enumerate(zip(prompts, specs, strict=True)):
        x = torch.stack([layer[row, layer.shape[1] - len(prompt) :] for layer in out.mlp_inputs], dim=1)  # [T, L, H]
        routes.append(plugged.context.sequence_route(x.float(), allow=spec.allow))
    return routes


def _observe(
    model: RoutedModel,
    prompts: list[list[int]],
    specs: list[RoutingSpec],
    plugged: PluggedSet,
    all_logits: bool = False,
) -> tuple[PromptKV, StepOutput, list[str]]:
    """The observed prefill of sequence-mode rows and each row's decision."""
    kv, out = prefill_rows(
        model,
        prompts,
        specs,
        plugged,
        observe=[True] * len(prompts),
        all_logits=all_logits,
        capture=plugged.context is not None,
    )
    routes = _decide(out, plugged, model, prompts, specs)
    out.mlp_inputs = []  # [B, T, H] per layer: not kept past the decision
    return kv, out, routes


def decide_routes(
    model: RoutedModel, prompts: list[list[int]], specs: list[RoutingSpec], plugged: PluggedSet | None = None
) -> list[str]:
    """The route `sequence` mode keeps for each prompt (an expert name or 'base'), from an observed prefill."""
    if not prompts:
        return []
    plugged = plugged if plugged is not None else model.plugged
    return _observe(model, prompts, specs, plugged)[2]


def prefill(
    model: RoutedModel,
    prompts: list[list[int]],
    specs: Sequence[RoutingSpec],
    plugged: PluggedSet | None = None,
    prompt_logits: bool = False,
) -> Prefill:
    """Prefill prompts under their routing; `sequence`-mode rows without a decision are decided here.

    prompt_logits: also return each row's logits at every prompt position (Prefill.prompt_logits), computed
    under the routing the row decodes with ([B, T, V] for the batch: prefill only the rows that need them).
    """
    plugged = plugged if plugged is not None else model.plugged
    specs = list(specs)
    undecided = [row for row, spec in enumerate(specs) if spec.mode == "sequence" and spec.expert is None]
    if not undecided:
        kv, out = prefill_rows(model, prompts, specs, plugged, all_logits=prompt_logits)
        per_row = _per_row(out.all_logits, prompts) if prompt_logits else None
        sources = [(kv, i) for i in range(len(prompts))]
        return Prefill(out.logits, specs, out.row_counts, out.layer_counts, sources, per_row)
    observed, seen, decided = _observe(
        model, [prompts[r] for r in undecided], [specs[r] for r in undecided], plugged, all_logits=prompt_logits
    )
    seen_rows = _per_row(seen.all_logits, [prompts[r] for r in undecided]) if prompt_logits else None
    full: dict[int, torch.Tensor] = {}
    sources: dict[int, tuple[PromptKV, int]] = {}
    logits: dict[int, torch.Tensor] = {}
    row_counts: dict[int, dict[str, float]] = {}
    base_tokens = 0.0
    for position, (row, route) in enumerate(zip(undecided, decided, strict=True)):
        specs[row] = RoutingSpec("sequence", expert=route, allow=specs[row].allow)
        if route == BASE_ROUTE:  # keeps the observed keys and values: the backbone's, bit for bit
            sources[row], logits[row] = (observed, position), seen.logits[position]
            if seen_rows is not None:
                full[row] = seen_rows[position]
            # every route keyed, as for the other rows; all of the row's decisions went to base
            counts = seen.row_counts[position]
            row_counts[row] = {**dict.fromkeys(counts, 0.0), BASE_ROUTE: sum(counts.values())}
            base_tokens += len(prompts[row])  # each took base on every layer
    layer_counts = [{**dict.fromkeys(counts, 0.0), BASE_ROUTE: base_tokens} for counts in seen.layer_counts]
    redo = [row for row in range(len(prompts)) if row not in sources]
    if redo:
        redo_prompts = [prompts[r] for r in redo]
        again, out = prefill_rows(model, redo_prompts, [specs[r] for r in redo], plugged, all_logits=prompt_logits)
        if prompt_logits:
            full.update(zip(redo, _per_row(out.all_logits, redo_prompts), strict=True))
        for position, row in enumerate(redo):
            sources[row], logits[row], row_counts[row] = (
                (again, position),
                out.logits[position],
                out.row_counts[position],
            )
        for total, counts in zip(layer_counts, out.layer_counts, strict=True):
            add_counts(total, counts)
    rows = range(len(prompts))
    return Prefill(
        torch.stack([logits[r] for r in rows]),
        specs,
        [row_counts[r] for r in rows],
        layer_counts,
        [sources[r] for r in rows],
        [full[r] for r in rows] if prompt_logits else None,
    )


def _per_row(all_logits: torch.Tensor, prompts: list[list[int]]) -> list[torch.Tensor]:
    """[B, T, V] left-padded -> per row [T_i, V], its real positions only."""
    return [all_logits[row, all_logits.shape[1] - len(prompt) :] for row, prompt in enumerate(prompts)]
