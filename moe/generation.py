"""The one routed generation path: prefill, decode one token, decode n tokens. Tensors only, no scheduling.

gpt-fast's habit, for a batch whose rows join and leave at any step (continuous batching):

    prefill(model, prompts, specs)       -> Prefill: a DecodeBatch with the prompts' KV cache, each row's
                                            next-token logits, and each row's final RoutingSpec. Rows in
                                            `sequence` mode are decided here (see below). With
                                            prompt_logits=True, also every prompt position's logits
                                            (prompt logprobs, `echo`); otherwise only the last position's
                                            logits are computed.
    decode_one_token(model, batch, ...)  -> StepOutput: every row's next-token logits and routing counts
    generate(model, tokenizer, ...)      -> complete whole prompts (decode n tokens): what evaluation,
                                            training and distillation run; the server's engine schedules
                                            prefill and decode_one_token itself, request by request.

Sequence mode's protocol, in one place: a row in `sequence` mode without a decision is first prefilled
*observed* (scored and traced on the plain backbone, no expert applied), `decide_sequence` picks one route
from its prompt's decisions, and the row is prefilled again with that expert; a row that chose base keeps
the observed cache, which is exactly the backbone's.

A DecodeBatch holds B sequences decoding together:

    cache.layers[l].keys/.values  [B, heads, S, D]   the transformers DynamicCache, left-padded
    mask                          [B, S]             1 = a real cached token, 0 = padding
    positions                     [B]                the position the row's next token takes

Rows are left-padded to a common length S, so every row's newest token sits in the last column and one
forward of input_ids [B, 1] decodes the whole batch. Batches prefilled at different times join by padding
the shorter side's cache on the left; finished rows are dropped with index_select, and leading columns
that became padding in every row are cut away, so S tracks the longest live sequence.

Semantics: decoding row i in a batch equals decoding it alone (padding is masked out of attention and
positions are per row), within float tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from moe.expert import BASE_ROUTE
from moe.plugged import PluggedSet
from moe.routed import RoutedModel
from moe.router import RoutingSpec, StepRouting, decide_sequence
from moe.sampling import SamplingParams, sample
from moe.trace import add_counts


@dataclass
class StepOutput:
    """What one forward produced for the batch: each row's next-token logits and its routing decisions."""

    logits: torch.Tensor  # [B, V], the last position of each row
    row_counts: list[dict[str, float]]  # per row {expert: decisions, ..., 'base': decisions}
    layer_counts: list[dict[str, float]]  # per layer, summed over rows
    all_logits: torch.Tensor | None = None  # [B, T, V] every position's logits (left-padded), when asked


def eos_token_ids(model: RoutedModel, tokenizer: Any) -> tuple[int, ...]:
    """Every id that ends a sequence: the generation config's, the model config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model.backbone, "generation_config", None), model.backbone.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


def context_length(model: RoutedModel) -> int:
    """Positions the backbone can attend over (its config's maximum; 2048 when the config names none)."""
    config = model.backbone.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


@dataclass
class Prefill:
    """Prompts prefilled together, in the caller's row order."""

    batch: DecodeBatch
    logits: torch.Tensor  # [B, V]: each row's next-token logits
    specs: list[RoutingSpec]  # each row's spec to decode with (sequence-mode decisions made)
    row_counts: list[dict[str, float]]  # decisions applied to each row's prompt
    layer_counts: list[dict[str, float]]  # per layer, applied decisions summed over rows
    prompt_logits: list[torch.Tensor] | None = None  # per row [T_i, V], when prefill was asked for them


class DecodeBatch:
    """Sequences decoding together with one KV cache (see the module docstring for shapes)."""

    def __init__(
        self,
        cache: DynamicCache | None = None,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        self.cache = cache
        self.mask = mask
        self.positions = positions

    def __len__(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @property
    def length(self) -> int:
        """S: cached columns, padding included."""
        return 0 if self.mask is None else int(self.mask.shape[1])

    @classmethod
    def prefill_rows(
        cls,
        model: RoutedModel,
        prompts: list[list[int]],
        specs: list[RoutingSpec],
        plugged: PluggedSet | None = None,
        observe: list[bool] | None = None,
        all_logits: bool = False,
    ) -> tuple[DecodeBatch, StepOutput]:
        """Run the prompts (left-padded to the longest) under their specs as given, and keep their cache.

        observe[i]: score and trace row i on the plain backbone without applying experts, so its cache is
        the exact backbone's. all_logits: keep every position's logits (StepOutput.all_logits), not only
        the last. `prefill` below is what callers use; this is its building block.
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
        with torch.inference_mode():
            # logits_to_keep=1: sampling needs only the last position's logits, not [B, T, V]
            out = model(
                ids,
                attention_mask=mask,
                routing=routing,
                plugged=plugged,
                past_key_values=DynamicCache(),
                position_ids=positions,
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
            )
        batch = cls(out.past_key_values, mask, mask.sum(dim=1))
        step = _step_output(out)
        step.all_logits = out.logits if all_logits else None
        return batch, step

    def extend(self, other: DecodeBatch) -> None:
        """Append other's rows (after this batch's rows), left-padding whichever cache is shorter."""
        if len(other) == 0:
            return
        if len(self) == 0:
            self.cache, self.mask, self.positions = other.cache, other.mask, other.positions
            return
        length = max(self.length, other.length)
        mine, theirs = _left_pad(self, length), _left_pad(other, length)
        for layer, ours in enumerate(self.cache.layers):
            ours.keys = torch.cat([mine[layer][0], theirs[layer][0]], dim=0)
            ours.values = torch.cat([mine[layer][1], theirs[layer][1]], dim=0)
        self.mask = torch.cat([_pad_mask(self.mask, length), _pad_mask(other.mask, length)], dim=0)
        self.positions = torch.cat([self.positions, other.positions])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order; then cut columns that are padding in every kept row."""
        if not rows:
            self.cache = self.mask = self.positions = None
            return
        if rows == list(range(len(self))):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        real_columns = self.mask.any(dim=0).nonzero()
        start = int(real_columns[0]) if len(real_columns) else 0  # leading all-pad columns
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]


def _decide(out: StepOutput, plugged: PluggedSet, model: RoutedModel) -> list[str]:
    return [decide_sequence(counts, plugged.names, model.router.sequence_min_share) for counts in out.row_counts]


def decide_routes(
    model: RoutedModel, prompts: list[list[int]], specs: list[RoutingSpec], plugged: PluggedSet | None = None
) -> list[str]:
    """The route `sequence` mode keeps for each prompt (an expert name or 'base'), from an observed prefill."""
    if not prompts:
        return []
    plugged = plugged if plugged is not None else model.plugged
    _, out = DecodeBatch.prefill_rows(model, prompts, specs, plugged, observe=[True] * len(prompts))
    return _decide(out, plugged, model)


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
        batch, out = DecodeBatch.prefill_rows(model, prompts, specs, plugged, all_logits=prompt_logits)
        per_row = _per_row(out.all_logits, prompts) if prompt_logits else None
        return Prefill(batch, out.logits, specs, out.row_counts, out.layer_counts, per_row)
    observed, seen = DecodeBatch.prefill_rows(
        model,
        [prompts[r] for r in undecided],
        [specs[r] for r in undecided],
        plugged,
        observe=[True] * len(undecided),
        all_logits=prompt_logits,
    )
    on_base: list[int] = []  # positions in `observed` of rows that chose base: they keep the observed cache
    for position, (row, route) in enumerate(zip(undecided, _decide(seen, plugged, model), strict=True)):
        specs[row] = RoutingSpec("sequence", expert=route, allow=specs[row].allow)
        if route == BASE_ROUTE:
            on_base.append(position)
    base_rows = [undecided[p] for p in on_base]
    redo = [row for row in range(len(prompts)) if row not in set(base_rows)]
    observed.keep(on_base)
    logits = [seen.logits[p] for p in on_base]
    seen_rows = _per_row(seen.all_logits, [prompts[r] for r in undecided]) if prompt_logits else None
    full = {row: seen_rows[p] for row, p in zip(base_rows, on_base, strict=True)} if seen_rows else {}
    row_counts = {  # every route keyed, as for the other rows; all of the row's decisions went to base
        row: {**dict.fromkeys(seen.row_counts[p], 0.0), BASE_ROUTE: sum(seen.row_counts[p].values())}
        for row, p in zip(base_rows, on_base, strict=True)
    }
    base_tokens = float(sum(len(prompts[row]) for row in base_rows))  # each took base on every layer
    layer_counts = [{**dict.fromkeys(counts, 0.0), BASE_ROUTE: base_tokens} for counts in seen.layer_counts]
    if redo:
        redo_prompts = [prompts[r] for r in redo]
        again, out = DecodeBatch.prefill_rows(
            model, redo_prompts, [specs[r] for r in redo], plugged, all_logits=prompt_logits
        )
        observed.extend(again)
        logits += list(out.logits)
        if prompt_logits:
            full.update(zip(redo, _per_row(out.all_logits, redo_prompts), strict=True))
        row_counts.update(zip(redo, out.row_counts, strict=True))
        for total, counts in zip(layer_counts, out.layer_counts, strict=True):
            add_counts(total, counts)
    order = base_rows + redo  # the batch's rows now; put them back in the caller's order
    where = {row: position for position, row in enumerate(order)}
    observed.keep([where[row] for row in range(len(prompts))])
    return Prefill(
        observed,
        torch.stack([logits[where[row]] for row in range(len(prompts))]),
        specs,
        [row_counts[row] for row in range(len(prompts))],
        layer_counts,
        [full[row] for row in range(len(prompts))] if prompt_logits else None,
    )


def _per_row(all_logits: torch.Tensor, prompts: list[list[int]]) -> list[torch.Tensor]:
    """[B, T, V] left-padded -> per row [T_i, V], its real positions only."""
    return [all_logits[row, all_logits.shape[1] - len(prompt) :] for row, prompt in enumerate(prompts)]


def decode_one_token(
    model: RoutedModel,
    batch: DecodeBatch,
    tokens: list[int],
    specs: list[RoutingSpec],
    plugged: PluggedSet | None = None,
) -> StepOutput:
    """Feed each row its newest token (tokens[i] for row i); the batch's cache grows by one column."""
    assert len(tokens) == len(batch) == len(specs), (len(tokens), len(batch), len(specs))
    device = batch.mask.device
    ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]  # [B, 1]
    mask = torch.cat([batch.mask, torch.ones(len(batch), 1, dtype=batch.mask.dtype, device=device)], dim=1)
    with torch.inference_mode():
        out = model(
            ids,
            attention_mask=mask,
            routing=specs,
            plugged=plugged,
            past_key_values=batch.cache,
            position_ids=batch.positions[:, None],
            use_cache=True,
        )
    batch.cache, batch.mask, batch.positions = out.past_key_values, mask, batch.positions + 1
    return _step_output(out)


def _step_output(out) -> StepOutput:
    return StepOutput(out.logits[:, -1, :], out.trace.row_counts(), out.trace.layer_counts())


def _left_pad(batch: DecodeBatch, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) [B, heads, length, D], zero-padded on the left."""
    pad = length - batch.length
    padded = []
    for layer in batch.cache.layers:
        keys, values = layer.keys, layer.values
        if pad:
            shape = (keys.shape[0], keys.shape[1], pad, keys.shape[3])
            keys = torch.cat([keys.new_zeros(shape), keys], dim=2)
            values = torch.cat([values.new_zeros(shape[:3] + (values.shape[3],)), values], dim=2)
        padded.append((keys, values))
    return padded


def _pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - mask.shape[1]
    return torch.cat([mask.new_zeros(mask.shape[0], pad), mask], dim=1) if pad else mask


# --- decode n tokens ---------------------------------------------------------------------------------


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, EOS excluded
    text: str
    finish_reason: str  # "stop" (EOS or a stop_token_id) or "length"
    route: str | None  # sequence mode: the decision; None otherwise
    counts: dict[str, float] = field(default_factory=dict)  # (token, layer) decisions, prompt and generated


@torch.no_grad()
def generate(
    model: RoutedModel,
    tokenizer: Any,
    prompts: Sequence[str],
    spec: RoutingSpec | Sequence[RoutingSpec],
    max_new_tokens: int,
    sampling: Sequence[SamplingParams] | None = None,
    plugged: PluggedSet | None = None,
    batch_size: int = 32,
    progress: Any = None,
) -> list[Generation]:
    """Complete each prompt as the server would (greedy unless `sampling` says), `batch_size` at a time.

    Rows stop at an EOS id (eos_token_ids) or one of their stop_token_ids, or after max_new_tokens; finished
    rows leave the batch.
    """
    plugged = plugged if plugged is not None else model.plugged
    specs = [spec] * len(prompts) if isinstance(spec, RoutingSpec) else list(spec)
    sampling = list(sampling) if sampling is not None else [SamplingParams()] * len(prompts)
    eos = eos_token_ids(model, tokenizer)
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        ids = [tokenizer(p)["input_ids"] for p in prompts[start:end]]
        results.extend(
            _decode_n(model, tokenizer, ids, specs[start:end], max_new_tokens, sampling[start:end], plugged, eos)
        )
        if progress is not None:
            progress.update(len(ids))
    return results


def _decode_n(
    model: RoutedModel,
    tokenizer: Any,
    prompts: list[list[int]],
    specs: list[RoutingSpec],
    max_new_tokens: int,
    params: list[SamplingParams],
    plugged: PluggedSet,
    eos: tuple[int, ...],
) -> list[Generation]:
    was_undecided = [s.mode == "sequence" and s.expert is None for s in specs]
    pre = prefill(model, prompts, specs, plugged)
    batch, specs = pre.batch, pre.specs
    counts = [dict(c) for c in pre.row_counts]
    generators = [p.generator(model.device) for p in params]
    generated: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    alive = list(range(len(prompts)))
    logits = pre.logits
    for step in range(max_new_tokens):
        tokens = sample(
            logits,
            [params[i] for i in alive],
            [generators[i] for i in alive],
            [step] * len(alive),
            eos,
            prompts=[prompts[i] for i in alive],
            outputs=[generated[i] for i in alive],
        )
        keep = []
        for row, (i, token) in enumerate(zip(alive, tokens, strict=True)):
            if token in eos or token in params[i].stop_token_ids:
                reasons[i] = "stop"
                continue
            generated[i].append(token)
            keep.append(row)
        if step == max_new_tokens - 1 or not keep:
            break
        batch.keep(keep)
        alive = [alive[row] for row in keep]
        out = decode_one_token(model, batch, [generated[i][-1] for i in alive], [specs[i] for i in alive], plugged)
        for i, row_counts in zip(alive, out.row_counts, strict=True):
            add_counts(counts[i], row_counts)
        logits = out.logits
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [
        Generation(ids, text, reason, spec.expert if undecided else None, c)
        for ids, text, reason, spec, undecided, c in zip(
            generated, texts, reasons, specs, was_undecided, counts, strict=True
        )
    ]
