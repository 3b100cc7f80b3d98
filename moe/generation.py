"""Batch bookkeeping for continuous batching: prefill, join, step, drop. Tensors only, no scheduling.

A DecodeBatch holds B sequences decoding together:

    cache.layers[l].keys/.values  [B, heads, S, D]   the transformers DynamicCache, left-padded
    mask                          [B, S]             1 = a real cached token, 0 = padding
    positions                     [B]                the position the row's next token takes

Rows are left-padded to a common length S, so every row's newest token sits in the last column and one
forward of input_ids [B, 1] decodes the whole batch. Sequences prefilled at different times join by
padding the shorter side's cache on the left; finished rows are dropped with index_select, and leading
columns that became padding in every row are cut away, so S tracks the longest live sequence.

Semantics: decoding row i in a batch equals decoding it alone (padding is masked out of attention and
positions are per row), within float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from moe.plugged import PluggedSet
from moe.routed import RoutedModel
from moe.router import RoutingSpec, StepRouting


@dataclass
class StepOutput:
    """What one forward produced for the batch: each row's next-token logits and its routing decisions."""

    logits: torch.Tensor  # [B, V], the last position of each row
    row_counts: list[dict[str, float]]  # per row {expert: decisions, ..., 'base': decisions}
    layer_counts: list[dict[str, float]]  # per layer, summed over rows


class DecodeBatch:
    """Sequences decoding together with one KV cache (see the module docstring for shapes)."""

    def __init__(
        self, cache: DynamicCache | None = None, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
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

    # --- building -------------------------------------------------------------------------------------

    @classmethod
    def prefill(
        cls,
        model: RoutedModel,
        prompts: list[list[int]],
        specs: list[RoutingSpec],
        plugged: PluggedSet | None = None,
        observe: list[bool] | None = None,
    ) -> tuple[DecodeBatch, StepOutput]:
        """Run the prompts (left-padded to the longest) and keep their cache.

        observe[i]: score and trace row i on the plain backbone without applying experts (sequence mode's
        prompt decision), so its cache is the exact backbone's.
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
        routing = StepRouting.from_specs(specs, plugged, mask.bool(), observe=observe)
        with torch.inference_mode():
            # logits_to_keep=1: prefill needs only the last position's logits, not [B, T, V]
            out = model(
                ids,
                attention_mask=mask,
                routing=routing,
                plugged=plugged,
                past_key_values=DynamicCache(),
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            )
        batch = cls(out.past_key_values, mask, mask.sum(dim=1))
        return batch, _step_output(out)

    def extend(self, other: DecodeBatch) -> None:
        """Append other's rows (after this batch's rows), left-padding whichever cache is shorter."""
        if len(other) == 0:
            return
        if len(self) == 0:
            self.cache, self.mask, self.positions = other.cache, other.mask, other.positions
            return
        length = max(self.length, other.length)
        mine, theirs = _left_pad(self, length), _left_pad(other, length)
        for layer, (ours, _their) in enumerate(zip(self.cache.layers, other.cache.layers, strict=True)):
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

    # --- decoding -------------------------------------------------------------------------------------

    def step(
        self,
        model: RoutedModel,
        tokens: list[int],
        specs: list[RoutingSpec],
        plugged: PluggedSet | None = None,
    ) -> StepOutput:
        """Feed each row its newest token (tokens[i] for row i) and return the next-token logits."""
        assert len(tokens) == len(self) == len(specs), (len(tokens), len(self), len(specs))
        device = self.mask.device
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]  # [B, 1]
        mask = torch.cat([self.mask, torch.ones(len(self), 1, dtype=self.mask.dtype, device=device)], dim=1)
        with torch.inference_mode():
            out = model(
                ids,
                attention_mask=mask,
                routing=specs,
                plugged=plugged,
                past_key_values=self.cache,
                position_ids=self.positions[:, None],
                use_cache=True,
            )
        self.cache, self.mask, self.positions = out.past_key_values, mask, self.positions + 1
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
