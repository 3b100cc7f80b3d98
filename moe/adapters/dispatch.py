"""Dispatch: turn per-token expert choices into batched adapter work.

Semantics (what `grouped_dispatch` computes, and `reference_dispatch` spells out):

    out = base.clone()
    for n in range(N):
        chosen = [e for e in choice[n] if e >= 0]
        for e in chosen:
            out[n] += adapter_e(x[n]) / len(chosen)

`slot_dispatch` is the decode form (top-1, slot storage, no host read); `routed_rows_dispatch` is the same over
only the rows that chose an expert, after one host read (eager decode on CPU). The grouped form sorts routed
(token, slot) pairs by expert and runs each expert that won tokens once,
on just its tokens (index_select, two small matmuls, index_add_). Base-route tokens are never touched,
and experts that won nothing cost nothing, so the cost grows with the routed tokens and k, not with
the number of experts plugged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moe.adapters.expert import adapter_delta
from moe.adapters.slots import LayerAdapter

# routed_rows_dispatch runs slot by slot up to this many slots with rows (~5 small ops each), slot_dispatch above
PER_SLOT_MAX = 2


def grouped_dispatch(
    x: torch.Tensor,
    base: torch.Tensor,
    choice: torch.Tensor,
    adapters: tuple[LayerAdapter | None, ...],
    chosen: torch.Tensor | None = None,
) -> torch.Tensor:
    """x, base [N, H]; choice [N, k] expert indices or -1; adapters[e] for this layer -> out [N, H].

    chosen [N]: how many experts each token chose, counting other kinds' (LoRA) choices that were emptied
    from `choice` (the 1/len(chosen) weight); None: counted from `choice`.
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
    counts_per_token = valid.sum(dim=1) if chosen is None else chosen  # --- LoRA experts: chosen counts them ---
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
    x: torch.Tensor, base: torch.Tensor, choice: torch.Tensor, down: torch.Tensor, up: torch.Tensor
) -> torch.Tensor:
    """slot_dispatch's semantics with one host read (eager decode where a read costs no device sync, i.e. on
    CPU; a captured step cannot read): `base` itself when no row routed; when at most PER_SLOT_MAX slots won
    rows, each runs once on just its rows (two plain matmuls over its slice of the storage), base rows
    untouched; else slot_dispatch (its fixed ops cost less than a run per slot)."""
    counts = torch.bincount(choice + 1, minlength=up.shape[0] + 1).tolist()  # [base, slot 0, ...]: the read
    if counts[0] != choice.shape[0] and sum(count > 0 for count in counts[1:]) > PER_SLOT_MAX:
        return slot_dispatch(x, base, choice, down, up)
    return _grouped_top1(x, base, choice, _StorageSlots(down, up), counts)


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


def reference_dispatch(
    x: torch.Tensor,
    base: torch.Tensor,
    choice: torch.Tensor,
    adapters: tuple[LayerAdapter | None, ...],
) -> torch.Tensor:
    """The plain per-token loop that grouped_dispatch must equal (used by tests)."""
    out = base.clone()
    for n in range(x.shape[0]):
        chosen = [int(e) for e in choice[n].tolist() if e >= 0]
        for e in chosen:
            adapter = adapters[e]
            assert adapter is not None
            out[n] += adapter_delta(x[n : n + 1], adapter.down, adapter.up)[0] / len(chosen)
    return out
